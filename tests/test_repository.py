"""The repository stands on its own: no file points at a path outside it or at one machine's folders."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match itself.
OUTSIDE = [
    re.escape(".." + "/shared"),
    *(re.escape(prefix) for prefix in ("/" + "work/", "/" + "root/", "/" + "home/", "/" + "Users/", "/" + "mnt/")),
    re.escape("/" + "usr/lib/"),
    re.escape("/" + "usr/local/lib/"),
    re.escape("/" + "opt/"),
]
PATTERN = re.compile("|".join(OUTSIDE))


def repository_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the file list comes from git")
    return [ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_no_file_refers_outside_the_repository():
    files = repository_files()
    assert len(files) > 20, files  # the listing found the repository
    offenders = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary data (golden vectors, plots)
        for number, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)
