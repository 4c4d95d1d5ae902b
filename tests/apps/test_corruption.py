"""A corruption matrix over every file of a save: each damage is refused by `train --resume`, and by `evaluate` and
`generate` when it is in a file they read, with a clear error (no traceback, the file named), exit code 1, and no
file changed. "resealed" cases also rewrite the manifest to match, as a deliberate edit would: then the checks
behind the checksums (configuration bounds, tensor shapes, finiteness, training-state fields) must catch it."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import TINY, make_text

from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.config import Config
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.core.checkpoint import CONFIG, FILES, MANIFEST, MODEL, STATE_JSON, STATE_TENSORS
from h_transformer_1d.apps.core.config import fields_of

MODEL_READERS = (MODEL, CONFIG, MANIFEST)  # the files evaluate and generate read; --resume reads all


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("corruption")
    (base / "corpus.txt").write_text(make_text(400))
    out = base / "run"
    torch.set_num_threads(1)
    args = ["train", "--data", str(base / "corpus.txt"), "--out", str(out), *TINY, "--steps", "2", "--eval-every", "1"]
    assert main([*args, "--eval-batches", "1"]) == 0
    return out


def snapshot(directory: Path) -> dict:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


def reseal(save: Path) -> None:
    """Rewrite the manifest for the files as they are now (a deliberate edit, not a damage)."""
    manifest = json.loads((save / MANIFEST).read_text())
    for name in FILES:
        data = (save / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["config"] = json.loads((save / CONFIG).read_text())["config"]
    (save / MANIFEST).write_text(json.dumps(manifest))


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))  # NaN and Infinity as JSON's extensions, as a careless writer would


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    edit(tensors)
    save_file(tensors, path, metadata=header.get("__metadata__"))


def flip_data(path: Path) -> None:
    """Flip 8 bytes in the middle of a file's data (past a safetensors header)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 + 4
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def set_config(name, value):
    return lambda save: edit_json(save / CONFIG, lambda r: r["config"].__setitem__(name, value))


def set_state(name, value):
    return lambda save: edit_json(save / STATE_JSON, lambda r: r.__setitem__(name, value))


def nan_in(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def exp_avg(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.startswith("optimizer.") and k.endswith("exp_avg"))


def change(tensors: dict, key: str, new) -> None:
    tensors[key] = new(tensors[key])


def in_tensors(name: str, edit):
    return lambda save: edit_tensors(save / name, edit)


def in_json(name: str, edit):
    return lambda save: edit_json(save / name, edit)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


# (name, the file damaged, damage(save directory), resealed, words the message must hold)
CASES = []
for name in (*FILES, MANIFEST):
    CASES += [
        (f"truncate {name}", name, lambda s, n=name: truncate(s / n), False, name),
        (f"empty {name}", name, lambda s, n=name: (s / n).write_bytes(b""), False, name),
        (f"flip bytes in {name}", name, lambda s, n=name: flip_data(s / n), False, name),
        (f"missing {name}", name, lambda s, n=name: (s / n).unlink(), False, name),
        (f"FIFO for {name}", name, lambda s, n=name: fifo(s / n), False, name),
    ]
for field, value in {**{f: 0 for f in fields_of(Config)}, "attention": "dense", "shift_tokens": False}.items():
    CASES.append((f"edit config {field}", CONFIG, set_config(field, value), False, CONFIG))
# resealed: what the weights or the bounds contradict
RESEALED_CONFIG = [("dim", 48), ("depth", 2), ("heads", 4), ("dim_head", 8), ("ff_mult", 2), ("depth", 1000000),
                   ("dim", 10**9), ("seq_len", 2**30), ("block_size", 3), ("attention", "sparse"), ("reversible", "yes"),
                   ("shift_tokens", None), ("dim_head", 2**20)]  # fmt: skip
for field, value in RESEALED_CONFIG:
    CASES.append((f"resealed config {field}={value}", CONFIG, set_config(field, value), True, CONFIG))
FIRST_WEIGHT = "net.token_emb.weight"
nan_weight = in_tensors(MODEL, lambda t: change(t, FIRST_WEIGHT, nan_in))
nan_exp_avg = in_tensors(STATE_TENSORS, lambda t: change(t, exp_avg(t), nan_in))
CASES += [
    ("NaN in a weight", MODEL, nan_weight, False, MODEL),
    ("resealed NaN in a weight", MODEL, nan_weight, True, "non-finite"),
    ("resealed weight of another shape", MODEL, in_tensors(MODEL, lambda t: change(t, FIRST_WEIGHT, lambda w: w[:1])),
     True, "wrong shape"),
    ("NaN in the optimizer state", STATE_TENSORS, nan_exp_avg, False, STATE_TENSORS),
    ("resealed NaN in the optimizer state", STATE_TENSORS, nan_exp_avg, True, "non-finite"),
    ("resealed RNG state of the wrong size", STATE_TENSORS,
     in_tensors(STATE_TENSORS, lambda t: change(t, "rng.cpu.0", lambda r: r[:100])), True, "rng.cpu.0"),
    ("resealed RNG state missing", STATE_TENSORS, in_tensors(STATE_TENSORS, lambda t: t.pop("rng.cpu.0")), True,
     "random states"),
    ("resealed optimizer tensor of another shape", STATE_TENSORS,
     in_tensors(STATE_TENSORS, lambda t: change(t, exp_avg(t), lambda m: m[:1])), True, "exp_avg"),
    ("resealed stranger tensor", STATE_TENSORS,
     in_tensors(STATE_TENSORS, lambda t: t.update({"optimizer.x.exp_avg": torch.zeros(1)})), True, "optimizer.x"),
    ("NaN step", STATE_JSON, set_state("step", float("nan")), False, STATE_JSON),
    ("resealed NaN step", STATE_JSON, set_state("step", float("nan")), True, "'step'"),
    ("resealed other step", STATE_JSON, set_state("step", 1), True, "different saves"),
    ("resealed NaN tokens", STATE_JSON, set_state("tokens", float("nan")), True, "'tokens'"),
    ("resealed negative tokens", STATE_JSON, set_state("tokens", -5), True, "'tokens'"),
    ("resealed infinite elapsed_s", STATE_JSON, set_state("elapsed_s", float("inf")), True, "'elapsed_s'"),
    ("resealed world_size 0", STATE_JSON, set_state("world_size", 0), True, "'world_size'"),
    ("resealed world_size 2", STATE_JSON, set_state("world_size", 2), True, "world_size 2"),
    ("resealed world_size text", STATE_JSON, set_state("world_size", "1"), True, "'world_size'"),
    ("resealed param_groups missing", STATE_JSON, set_state("param_groups", None), True, "'param_groups'"),
    ("resealed lr NaN", STATE_JSON, in_json(STATE_JSON, lambda r: r["param_groups"][0].update(lr=float("nan"))),
     True, "'lr'"),
    ("resealed params naming no weight", STATE_JSON,
     in_json(STATE_JSON, lambda r: r["param_groups"][0]["params"].append("net.nothing")), True, "'param_groups'"),
    ("manifest of another step", MANIFEST, in_json(MANIFEST, lambda m: m.update(step=1)), False, MANIFEST),
    ("manifest without a file", MANIFEST, in_json(MANIFEST, lambda m: m["files"].pop(MODEL)), False, MANIFEST),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_damage_is_refused_and_nothing_changes(case, run, tmp_path, capsys):
    _, damaged_file, damage, resealed, words = case
    out = tmp_path / "run"
    shutil.copytree(run, out)
    save = checkpoint.locate(out)
    damage(save)
    if resealed:
        reseal(save)
    before = snapshot(out)
    commands = [["train", "--out", str(out), "--resume", "--steps", "4"]]
    if damaged_file in MODEL_READERS:
        commands += [["evaluate", "--checkpoint", str(out), "--max-batches", "1"],
                     ["generate", "--checkpoint", str(out), "--length", "1"]]  # fmt: skip
    for args in commands:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(f"h-transformer-1d {args[0]}: error:") and "Traceback" not in err, err
        assert words in err and str(save) in err, err
    assert snapshot(out) == before


def test_the_matrix_covers_every_file_and_every_config_field():
    damaged = {c[1] for c in CASES}
    assert damaged == {*FILES, MANIFEST}
    edited = {c[0].split()[-1].split("=")[0] for c in CASES if c[0].startswith(("edit config", "resealed config"))}
    assert set(fields_of(Config)) <= edited
    print(f"{len(CASES)} damages x up to 3 commands, {sum(3 if c[1] in MODEL_READERS else 1 for c in CASES)} refusals")


def test_moving_a_damaged_save_away_resumes_from_the_one_before(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    damaged = checkpoint.locate(out)
    flip_data(damaged / MODEL)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 1
    assert f"move {damaged} out of" in capsys.readouterr().err
    shutil.move(damaged, tmp_path / "damaged")
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert [step for step, _ in checkpoint.saves(out)] == [2, 3]


@pytest.mark.parametrize("poison", ["weight", "optimizer"])
def test_nonfinite_weights_or_optimizer_state_are_never_saved(run, tmp_path, monkeypatch, capsys, poison):
    """A weight or moment that turns NaN in the update of step 3 (the loss of step 3, computed before it, is
    finite) stops the run at the save of step 3, which is not written."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        param = self.param_groups[0]["params"][0]
        with torch.no_grad():
            (param if poison == "weight" else self.state[param]["exp_avg"]).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert main(["train", "--out", str(out), "--resume", "--steps", "4"]) == 1
    err = capsys.readouterr().err
    what = "weight net.token_emb.weight" if poison == "weight" else "optimizer exp_avg of net.token_emb.weight"
    assert f"step 3: the {what} holds NaN or infinity (not finite), so training stopped" in err, err
    assert f"{out} keeps the checkpoint of step 2" in err and "Traceback" not in err
    assert [step for step, _ in checkpoint.saves(out)] == [1, 2]
    assert not list((out / checkpoint.SAVES).glob("*.tmp-*"))
