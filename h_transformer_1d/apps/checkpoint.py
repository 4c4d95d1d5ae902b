"""Checkpoints: a directory of four files, each written atomically (temporary file, then os.replace).

    model.safetensors        weights                                   metadata: step
    config.json              the run's Config                          {"format", "step", "config"}
    train_state.safetensors  optimizer tensors, RNG states per process  metadata: step
    train_state.json         step, tokens, time, optimizer groups      {"format", "step", ...}

Files are written in that order, the small JSON state last. Loading checks every file and that all
carry one step before anything is used, so a corrupt, truncated, mixed or mismatched checkpoint is
refused with a clear message and nothing is touched.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .config import Config, ConfigError, build_model, from_dict, to_dict

FORMAT = 1
MODEL, CONFIG, STATE_TENSORS, STATE_JSON = (
    "model.safetensors",
    "config.json",
    "train_state.safetensors",
    "train_state.json",
)
FILES = (MODEL, CONFIG, STATE_TENSORS, STATE_JSON)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


@dataclass
class Checkpoint:
    directory: Path
    step: int
    config: Config
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None  # {"state": {fqn: {name: tensor}}, "param_groups": [...]}
    rng: dict[str, torch.Tensor] | None = None  # "cpu.<rank>" / "cuda.<rank>" -> state
    state: dict | None = None  # train_state.json


def exists(directory: Path) -> bool:
    return any((directory / name).exists() for name in FILES)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(
    directory: Path,
    *,
    step: int,
    config: Config,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict[str, torch.Tensor],
    state: dict,
) -> None:
    """Write one checkpoint of `step`; `state` holds JSON-able training progress (tokens, elapsed, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": str(FORMAT), "step": str(step)}
    weights = {name: t.detach().contiguous() for name, t in model.items()}
    atomic_write(directory / MODEL, safetensors_bytes(weights, metadata=meta))
    atomic_write(directory / CONFIG, json_bytes({"format": FORMAT, "step": step, "config": to_dict(config)}))
    tensors = {
        f"optimizer.{fqn}.{name}": t.contiguous() for fqn, s in optimizer["state"].items() for name, t in s.items()
    }
    tensors.update({f"rng.{key}": t.contiguous() for key, t in rng.items()})
    atomic_write(directory / STATE_TENSORS, safetensors_bytes(tensors, metadata=meta))
    record = {"format": FORMAT, "step": step, **state, "param_groups": optimizer["param_groups"]}
    atomic_write(directory / STATE_JSON, json_bytes(record))


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("step"), int):
        raise CheckpointError(f"{path} is not a checkpoint file of format {FORMAT}")
    return obj


def read_safetensors(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safe_open handle is not a dict)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {e}") from None
    if meta.get("format") != str(FORMAT) or not meta.get("step", "").isdigit():
        raise CheckpointError(f"{path} is not a checkpoint file of format {FORMAT}")
    return int(meta["step"]), tensors


def check_weights(weights: dict[str, torch.Tensor], cfg: Config, path: Path) -> None:
    """The weights must be exactly those of the model that `cfg` builds: names, shapes and dtypes."""
    try:
        with torch.device("meta"):
            expected = build_model(cfg).state_dict()
    except ConfigError as e:
        raise CheckpointError(f"{path.parent / CONFIG}: {e}") from None
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{name} {tuple(weights[name].shape)} (expected {tuple(t.shape)})"
        for name, t in expected.items()
        if name in weights and (weights[name].shape != t.shape or weights[name].dtype != t.dtype)
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise CheckpointError(f"{path} does not fit the model of {path.parent / CONFIG}: {details}")


def load(directory: Path, training: bool = False) -> Checkpoint:
    """Read and check a checkpoint; `training` also reads the optimizer and RNG state (for --resume)."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    needed = FILES if training else (MODEL, CONFIG)
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a complete checkpoint: missing {', '.join(missing)}")

    record = read_json(directory / CONFIG)
    steps = {CONFIG: record["step"]}
    steps[MODEL], weights = read_safetensors(directory / MODEL)
    try:
        cfg = from_dict(record.get("config", {}), str(directory / CONFIG))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    check_weights(weights, cfg, directory / MODEL)
    ckpt = Checkpoint(directory, record["step"], cfg, weights)
    if training:
        ckpt.state = read_json(directory / STATE_JSON)
        steps[STATE_JSON] = ckpt.state["step"]
        steps[STATE_TENSORS], tensors = read_safetensors(directory / STATE_TENSORS)
        ckpt.optimizer, ckpt.rng = unflatten_state(tensors, ckpt.state, weights, directory / STATE_TENSORS)
    if len(set(steps.values())) > 1:
        found = ", ".join(f"{name} step {step}" for name, step in steps.items())
        raise CheckpointError(f"{directory} mixes files of different saves ({found}): the last save was interrupted")
    return ckpt


def unflatten_state(tensors: dict, state: dict, weights: dict, path: Path) -> tuple[dict, dict]:
    """The optimizer state dict and RNG states; every optimizer tensor must belong to a weight of its shape."""
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise CheckpointError(f"{path.parent / STATE_JSON}: param_groups missing or malformed")
    strangers = sorted({name for g in groups for name in g["params"]} - set(weights))
    optimizer = {"state": {}, "param_groups": groups}
    rng = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            rng[rest] = t
            continue
        fqn, _, name = rest.rpartition(".")
        if kind != "optimizer" or fqn not in weights or (t.dim() and t.shape != weights[fqn].shape):
            strangers.append(key)
        optimizer["state"].setdefault(fqn, {})[name] = t
    if strangers:
        raise CheckpointError(f"{path} does not fit the model of {path.parent / CONFIG}: {', '.join(strangers[:3])}")
    return optimizer, rng
