"""Bounded inputs: --data is read from regular files only, streamed and inflated up to --max-data-bytes; --out
never names a file; files are written through exclusively created temporaries, so a planted link is not followed."""

import gzip
import os
import tracemalloc
import zipfile

import pytest
from test_cli import TINY, make_text

from h_transformer_1d.apps import data
from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.core import files
from h_transformer_1d.apps.lra import listops
from h_transformer_1d.apps.lra.train import load_split

INFLATED = 64 << 20  # a zip bomb's content: 64 MiB of zeros, some 64 KiB compressed
LIMIT = 1 << 20


def zeros_archive(path, kind: str) -> None:
    chunk = bytes(1 << 20)
    if kind == "zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("enwik8", "w") as f:
            for _ in range(INFLATED // len(chunk)):
                f.write(chunk)
    else:
        with gzip.open(path, "wb", compresslevel=1) as f:
            for _ in range(INFLATED // len(chunk)):
                f.write(chunk)


@pytest.mark.parametrize("kind", ["zip", "gz"])
def test_an_archive_bomb_stops_at_the_limit_in_bounded_memory(tmp_path, kind):
    bomb = tmp_path / f"bomb.{kind}"
    zeros_archive(bomb, kind)
    assert bomb.stat().st_size < INFLATED / 100
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match=f"--data {bomb}: more than 1,048,576 bytes"):
            data.load_corpus(str(bomb), LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * LIMIT  # the bytes read up to the limit and a chunk, never the 64 MiB


def test_the_limit_holds_for_files_directories_and_the_command(tmp_path, capsys):
    text = make_text(400).encode()
    (tmp_path / "a.txt").write_bytes(text)
    assert len(data.load_corpus(str(tmp_path / "a.txt"), len(text)).train) == len(text) * 90 // 100
    with pytest.raises(data.DataError, match="more than"):
        data.load_corpus(str(tmp_path / "a.txt"), len(text) - 1)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_bytes(text)
    with pytest.raises(data.DataError, match="more than"):
        data.load_corpus(str(folder), 2 * len(text))
    args = ["train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "run"), *TINY]
    assert main([*args, "--max-data-bytes", "1000"]) == 1
    err = capsys.readouterr().err
    assert "more than 1,000 bytes" in err and "raise --max-data-bytes" in err and "Traceback" not in err
    assert main([*args, "--max-data-bytes", "0"]) == 2
    assert "--max-data-bytes must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX FIFOs and devices")
def test_fifo_and_devices_are_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY]) == 1
        err = capsys.readouterr().err
        assert f"--data {path}: {path} is {kind}, not a regular file" in err and "Traceback" not in err
    listops_dir = tmp_path / "listops"
    listops_dir.mkdir()
    os.mkfifo(listops_dir / listops.SPLITS["train"])
    with pytest.raises(data.DataError, match="is a FIFO, not a regular file"):
        load_split(listops_dir, "train")
    (listops_dir / listops.SPLITS["val"]).write_text(listops.HEADER + "\n[MAX 2 9 ]\t9\n")
    with pytest.raises(data.DataError, match="more than --max-data-bytes 10"):
        load_split(listops_dir, "val", 10)


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(make_text(400))
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "run"):
        for resume in ([], ["--resume"]):
            assert main(["train", "--data", str(tmp_path / "a.txt"), "--out", str(out), *TINY, *resume]) == 2
            err = capsys.readouterr().err
            assert f"--out {out} names a file, not a directory" in err and "Traceback" not in err
    assert taken.read_text() == "mine"


def test_a_planted_link_is_never_followed(tmp_path):
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        files.write_new(link, b"overwritten")
    files.atomic_write(link, b"new")  # the link itself is replaced, its target is not written through
    assert target.read_text() == "precious" and link.read_bytes() == b"new" and not link.is_symlink()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("target", "link")]
    assert leftovers == []
