"""Checkpoints: a directory of four files, each written atomically (temporary file, then os.replace).

    model.safetensors        weights                                   metadata: step
    config.json              the run's configuration                   {"format", "step", "task", "config"}
    train_state.safetensors  optimizer tensors, RNG states per process  metadata: step
    train_state.json         step, tokens, time, optimizer groups      {"format", "step", ...}

Files are written in that order, the small JSON state last. Loading checks every file and that all
carry one step before anything is used, so a corrupt, truncated, mixed or mismatched checkpoint is
refused with a clear message and nothing is touched.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ConfigError, from_dict, to_dict, validate

FORMAT = 1
# config.json names the application that wrote it; language-model checkpoints of earlier versions name none
UNNAMED_TASK = "lm"
MODEL, CONFIG, STATE_TENSORS, STATE_JSON = (
    "model.safetensors",
    "config.json",
    "train_state.safetensors",
    "train_state.json",
)
FILES = (MODEL, CONFIG, STATE_TENSORS, STATE_JSON)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


@dataclass(frozen=True)
class App:
    """What the core needs to know of an application to save, check and load its runs."""

    task: str  # written to config.json
    config: type  # its configuration dataclass
    build_model: Callable  # configuration -> the module whose weights a checkpoint holds
    command: str  # the command that writes its runs, for messages
    upgrade: Callable[[dict], dict] | None = None  # a stored configuration of an earlier version -> this one's

    def model_of(self, ckpt: "Checkpoint", device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model of a checkpoint with its weights, in eval mode on `device`."""
        model = self.build_model(ckpt.config)
        model.load_state_dict(ckpt.model)
        return model.to(device).eval()


@dataclass
class Checkpoint:
    directory: Path
    step: int
    config: object  # the App's configuration
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
    app: App,
    *,
    step: int,
    config,
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
    atomic_write(directory / CONFIG, json_bytes({"format": FORMAT, "step": step, "task": app.task, "config": to_dict(config)}))
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


def check_weights(weights: dict[str, torch.Tensor], app: App, cfg, path: Path) -> None:
    """The weights must be exactly those of the model that `cfg` builds: names, shapes and dtypes."""
    try:
        validate(cfg)
        with torch.device("meta"):
            expected = app.build_model(cfg).state_dict()
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


def read_record(directory: Path, needed: tuple[str, ...] = (MODEL, CONFIG)) -> dict:
    """config.json of a checkpoint directory holding the files `needed`."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a complete checkpoint: missing {', '.join(missing)}")
    record = read_json(directory / CONFIG)
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{directory / CONFIG} holds no configuration")
    return record


def task_of(directory: Path) -> str:
    """The application that wrote the checkpoint in `directory`."""
    return read_record(directory).get("task", UNNAMED_TASK)


def load(directory: Path, app: App, training: bool = False) -> Checkpoint:
    """Read and check a checkpoint of `app`; `training` also reads the optimizer and RNG state (for --resume)."""
    record = read_record(directory, FILES if training else (MODEL, CONFIG))
    task = record.get("task", UNNAMED_TASK)
    if task != app.task:
        raise CheckpointError(f"{directory / CONFIG} is a {task} checkpoint, not one of {app.command}")
    steps = {CONFIG: record["step"]}
    steps[MODEL], weights = read_safetensors(directory / MODEL)
    try:
        values = app.upgrade(record["config"]) if app.upgrade else record["config"]
        cfg = from_dict(app.config, values, str(directory / CONFIG))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    check_weights(weights, app, cfg, directory / MODEL)
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
