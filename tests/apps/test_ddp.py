"""Two processes (torchrun, gloo on the CPU) train like one process with the same global batch."""

import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import TINY, make_text

from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.config import LM
from h_transformer_1d.apps.core import checkpoint

ARGS = [
    *TINY,
    "--batch-size",
    "8",
    "--grad-accum",
    "2",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--sample-every",
    "4",
    "--sample-length",
    "8",
]


def losses(out: Path) -> list[tuple[int, float, float | None]]:
    with open(out / "metrics.csv", newline="") as f:
        return [
            (int(r["step"]), float(r["train_bpb"]), float(r["val_bpb"]) if r["val_bpb"] else None)
            for r in csv.DictReader(f)
        ]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """The one-process run to compare with, and its corpus."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(corpus), "--out", str(root / "single"), *ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
    return corpus, root / "single"


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, sharding):
    corpus, reference = single
    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "h_transformer_1d",
        "train",
        "--data",
        str(corpus),
        "--out",
        str(out),
        *ARGS,
        *sharding,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: the rendezvous takes a free port, so runs in parallel (pytest-xdist) never collide
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 2:") == 1  # only process 0 prints

    expected, got = losses(reference), losses(out)
    assert [s for s, _, _ in got] == [s for s, _, _ in expected]
    for (_, train_a, val_a), (_, train_b, val_b) in zip(expected, got):
        assert train_b == pytest.approx(train_a, rel=1e-4)
        assert (val_a is None) == (val_b is None) and (val_a is None or val_b == pytest.approx(val_a, rel=1e-4))
    a, b = checkpoint.load(reference, LM, training=True), checkpoint.load(out, LM, training=True)
    for name, weight in a.model.items():
        torch.testing.assert_close(b.model[name], weight, rtol=1e-4, atol=1e-5)
    assert set(b.optimizer["state"]) == set(a.optimizer["state"])
    assert sorted(b.rng) == ["cpu.0", "cpu.1"]


@pytest.mark.parametrize("failing", [False, True])
def test_processes_wait_for_one_another_before_leaving_the_group_unless_failing(monkeypatch, failing):
    """stop_runtime: a barrier before destroying the group on the normal path, none while an exception
    propagates (the other processes may never reach it)."""
    from h_transformer_1d.apps.core import runtime

    calls = []
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runtime.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(runtime.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with pytest.raises(RuntimeError) if failing else contextlib.nullcontext():
        try:
            if failing:
                raise RuntimeError("a failed step")
        finally:
            runtime.stop_runtime()
    assert calls == (["destroy"] if failing else ["barrier", "destroy"])
