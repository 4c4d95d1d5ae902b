"""Fault injection: a tiny run, checkpointing every step, killed with SIGKILL again and again and resumed from what
is on disk each time, must lose nothing and end exactly where an uninterrupted run ends.

The killed runs are child interpreters (a fork of the test process would inherit its threads' locks, pytest's and
xdist's among them, and can hang on one): once at random moments from outside, and once from inside at every I/O
stage of a save in turn (the child kills itself just before its n-th fsync or rename). Nothing in the package knows
about this test.
"""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import TINY, make_text

from h_transformer_1d.apps import train as train_module
from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.config import LM
from h_transformer_1d.apps.core import checkpoint

STEPS = 10
RUN = [*TINY, "--steps", str(STEPS), "--eval-every", "1", "--eval-batches", "1", "--dropout", "0.1"]
KEYS = ("step", "tokens", "lr", "train_bpb", "val_bpb")
RANDOM_KILLS = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(make_text(600))
    return path


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """curves.png is redrawn at every save; it is not what is tested, and matplotlib would take most of the time."""
    monkeypatch.setattr(train_module, "plot_curves", lambda *args, **kwargs: None)


def argv(out: Path, corpus: Path) -> list[str]:
    """Resume from the last complete save if there is one; else start the run (nothing was saved yet)."""
    if checkpoint.exists(out):
        return ["train", "--out", str(out), "--resume"]
    return ["train", "--data", str(corpus), "--out", str(out), *RUN]


# The child: the training tool's main, with curves.png not drawn (not what is tested; matplotlib would take most of
# the time) and, given a call number, a SIGKILL just before that call of os.fsync, os.rename or os.replace, after
# writing down what the call was about to do.
CHILD = """
import json, os, signal, sys
args, target, log = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import torch
torch.set_num_threads(1)
from h_transformer_1d.apps import train as train_module
from h_transformer_1d.apps.cli import main
train_module.plot_curves = lambda *a, **k: None
count = [0]
def wrap(name, real):
    def call(*a):
        count[0] += 1
        if count[0] == target:
            what = [os.readlink(f"/proc/self/fd/{x}") if isinstance(x, int) else str(x) for x in a]
            with open(log, "a") as f:
                f.write(name + " " + " ".join(what) + chr(10))
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a)
    return call
if target:
    for name in ("fsync", "rename", "replace"):
        setattr(os, name, wrap(name, getattr(os, name)))
sys.exit(main(args))
"""


def spawn(args: list[str], target: int = 0, log: Path | None = None) -> subprocess.Popen:
    """A child interpreter running `main(args)` with its output thrown away; `target`: see CHILD."""
    command = [sys.executable, "-c", CHILD, json.dumps(args), str(target), str(log or os.devnull)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rows(out: Path) -> list[list[str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [[r[k] for k in KEYS] for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run, in this process, and the time of one of its steps (warm: a child's steps take about
    as long once its interpreter has started, which `wait_for_a_save` waits out)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "plot_curves", lambda *args, **kwargs: None)
        torch.set_num_threads(1)
        start = time.perf_counter()
        assert main(argv(out, corpus)) == 0
    return out, (time.perf_counter() - start) / STEPS  # the first step's extra work included: rather more


def assert_same_run(out: Path, reference: Path) -> None:
    assert rows(out) == rows(reference)
    a, b = (checkpoint.load(run, LM, training=True) for run in (out, reference))
    assert a.step == b.step == STEPS
    assert all(torch.equal(a.model[k], b.model[k]) for k in b.model)
    for fqn, state in b.optimizer["state"].items():
        assert all(torch.equal(a.optimizer["state"][fqn][k], t) for k, t in state.items())
    assert all(torch.equal(a.rng[k], t) for k, t in b.rng.items())
    assert not [p for p in (out / checkpoint.SAVES).iterdir() if checkpoint.TEMPORARY.fullmatch(p.name)]
    assert len(checkpoint.saves(out)) == checkpoint.KEEP


def last_complete(out: Path) -> int:
    """The step of the last complete save, checked as --resume checks it (0 if none)."""
    return checkpoint.load(out, LM, training=True).step if checkpoint.exists(out) else 0


def saves_listing(out: Path) -> set[str]:
    saves = out / checkpoint.SAVES
    return {p.name for p in saves.iterdir()} if saves.is_dir() else set()


def wait_for_a_save(child, out: Path, timeout: float = 60.0) -> int | None:
    """Until the child begins a save of its own (the saves folder changes): None, or the child's exit status if it
    ended first. Kills are timed from there, not from the start, so that the interpreter's start (slower on a loaded
    machine) does not move every kill before the first save. A child that begins none within `timeout` is killed
    all the same."""
    before, deadline = saves_listing(out), time.monotonic() + timeout
    while saves_listing(out) == before and time.monotonic() < deadline:
        if child.poll() is not None:
            return child.returncode
        time.sleep(0.001)
    return None


def test_random_kills_lose_nothing(corpus, reference, tmp_path):
    reference_out, step_time = reference
    rng = random.Random(30)
    out = tmp_path / "run"
    kills = mid_save = 0
    saved = 0
    # more kills only while none has hit a save (a fast machine can finish most saves between two polls)
    while kills < RANDOM_KILLS or (not mid_save and kills < 4 * RANDOM_KILLS):
        child = spawn(argv(out, corpus))
        status = wait_for_a_save(child, out)
        if status is None:
            # half at once (the save just begun is likely still running), half within the next step
            time.sleep(0.0 if rng.random() < 0.5 else rng.uniform(0, step_time))
            child.send_signal(signal.SIGKILL)  # a child that has exited but is not yet waited for ignores it
            status = child.wait()
        if status != -signal.SIGKILL:  # the run ended first: start it over
            assert status == 0 and last_complete(out) == STEPS
            shutil.rmtree(out)
            saved = 0
            continue
        kills += 1
        mid_save += any(checkpoint.TEMPORARY.fullmatch(p.name) for p in (out / checkpoint.SAVES).glob("*"))
        now = last_complete(out)  # a kill never loses a complete save, and what is there always loads
        assert now >= saved
        saved = now
    assert spawn(argv(out, corpus)).wait() == 0
    assert_same_run(out, reference_out)
    print(f"{kills} kills at random moments, {mid_save} of them during a save; nothing lost")
    assert mid_save >= 1  # the moments drawn hit saves, not only the steps between them


def stage(line: str) -> str:
    """The stage of a save that a logged call belongs to, in words."""
    name, *paths = line.split()
    last = Path(paths[-1]).name
    if name == "fsync":
        if ".tmp-" in Path(paths[0]).parent.name:
            return f"fsync {last}"
        return "fsync of the save directory" if ".tmp-" in last else f"fsync {last}"
    if name == "rename":
        return "rename into place" if checkpoint.SAVE_NAME.fullmatch(last) else "rename an old save away"
    return f"{name} {last.split('.')[1] if last.startswith('.') else last}"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the file of an fsync through /proc")
def test_a_kill_at_every_stage_of_a_save_loses_nothing(corpus, reference, tmp_path):
    reference_out, _ = reference
    out, log = tmp_path / "run", tmp_path / "kills.log"
    # A run's start makes 3 of these calls (metrics.csv written anew); a save 8 (5 files, their directory, the
    # rename into place, the folder), plus one per older save renamed away. The first child saves steps 1 and 2
    # and dies as it begins the third save; each later child dies in its first save, one call further each time.
    targets = [3 + 8 + 8 + 1] + [3 + 1 + k for k in range(9)]
    for target in targets:
        saved = last_complete(out)
        assert spawn(argv(out, corpus), target, log).wait() == -signal.SIGKILL
        assert last_complete(out) >= saved
    assert spawn(argv(out, corpus)).wait() == 0
    assert_same_run(out, reference_out)
    stages = {stage(line) for line in log.read_text().splitlines()}
    expected = {f"fsync {name}" for name in (*checkpoint.FILES, checkpoint.MANIFEST)}
    expected |= {"fsync of the save directory", "rename into place", f"fsync {checkpoint.SAVES}",
                 "rename an old save away"}  # fmt: skip
    assert expected <= stages, sorted(stages)
    print(f"{len(targets)} kills inside saves, at {len(stages)} distinct stages: {sorted(stages)}; nothing lost")
