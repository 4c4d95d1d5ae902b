"""Fault injection: a tiny run, checkpointing every step, killed with SIGKILL again and again and resumed from what
is on disk each time, must lose nothing and end exactly where an uninterrupted run ends.

The killed runs are forked children of the test process (no interpreter start per kill): once at random moments
from outside, and once from inside at every I/O stage of a save in turn (the child kills itself just before its
n-th fsync or rename). Nothing in the package knows about this test.
"""

import csv
import os
import random
import shutil
import signal
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
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed runs are forked children")


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


def fork(args: list[str], before=None) -> int:
    """A child process that runs `main(args)` with its output thrown away (`before()` first) and exits."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            torch.set_num_threads(1)
            if before:
                before()
            code = main(args)
        finally:
            os._exit(code)
    return pid


def rows(out: Path) -> list[list[str]]:
    with open(out / "metrics.csv", newline="") as f:
        return [[r[k] for k in KEYS] for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run, and the time of one of its steps. It runs in this process, so the children forked
    later start warm (modules imported, first-call work done) and reach their first save in a fraction of a second."""
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


def test_random_kills_lose_nothing(corpus, reference, tmp_path):
    reference_out, step_time = reference
    rng = random.Random(30)
    out = tmp_path / "run"
    kills = mid_save = 0
    saved = 0
    while kills < RANDOM_KILLS:
        pid = fork(argv(out, corpus))
        time.sleep(rng.uniform(0, 3 * step_time))  # a start, then a step or two: often within a save
        os.kill(pid, signal.SIGKILL)  # a child that has exited but is not yet waited for ignores it
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != -signal.SIGKILL:  # the run ended first: start it over
            assert os.waitstatus_to_exitcode(status) == 0 and last_complete(out) == STEPS
            shutil.rmtree(out)
            saved = 0
            continue
        kills += 1
        mid_save += any(checkpoint.TEMPORARY.fullmatch(p.name) for p in (out / checkpoint.SAVES).glob("*"))
        now = last_complete(out)  # a kill never loses a complete save, and what is there always loads
        assert now >= saved
        saved = now
    _, status = os.waitpid(fork(argv(out, corpus)), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert_same_run(out, reference_out)
    print(f"{kills} kills at random moments, {mid_save} of them during a save; nothing lost")
    assert mid_save >= 1  # the moments drawn hit saves, not only the steps between them


def die_at(target: int, log: Path):
    """In the child: count the calls of os.fsync, os.rename and os.replace, and SIGKILL this process just before
    call number `target`, after writing down what that call was about to do."""
    count = [0]

    def wrap(name, real):
        def call(*args):
            count[0] += 1
            if count[0] == target:
                what = [os.readlink(f"/proc/self/fd/{a}") if isinstance(a, int) else str(a) for a in args]
                with open(log, "a") as f:
                    f.write(f"{name} {' '.join(what)}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)

        return call

    def install():
        for name in ("fsync", "rename", "replace"):
            setattr(os, name, wrap(name, getattr(os, name)))

    return install


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
        pid = fork(argv(out, corpus), die_at(target, log))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
        assert last_complete(out) >= saved
    _, status = os.waitpid(fork(argv(out, corpus)), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert_same_run(out, reference_out)
    stages = {stage(line) for line in log.read_text().splitlines()}
    expected = {f"fsync {name}" for name in (*checkpoint.FILES, checkpoint.MANIFEST)}
    expected |= {"fsync of the save directory", "rename into place", f"fsync {checkpoint.SAVES}",
                 "rename an old save away"}  # fmt: skip
    assert expected <= stages, sorted(stages)
    print(f"{len(targets)} kills inside saves, at {len(stages)} distinct stages: {sorted(stages)}; nothing lost")
