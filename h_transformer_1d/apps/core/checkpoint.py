"""Checkpoints: each save is a directory of its own, complete or absent.

    <out>/checkpoints/step-000012/   a complete save (the last KEEP of them are kept)
        model.safetensors        weights                                   metadata: format, step
        config.json              {"format", "step", "task", "config"}
        train_state.safetensors  optimizer tensors, RNG state per process  metadata: format, step
        train_state.json         step, progress (tokens, time, ...), world_size, optimizer groups
        manifest.json            written last: size and SHA-256 of the four files, step, task, configuration

A save is written into `step-000012.tmp-<random>` (created exclusively by mkdtemp), every file flushed to disk,
then renamed to `step-000012` in one atomic step; only then are older saves renamed to `*.old-<random>` and
deleted. So a kill at any moment leaves the previous complete save in place, plus at most a temporary that the
next run removes when it starts; a complete save is told from a temporary by its name alone, and the last
one is the highest step.

Loading checks everything before anything large is allocated or used: each file read against the manifest
(size, SHA-256, read in chunks), config.json against the manifest, the configuration against its bounds, the
tensor names, shapes and dtypes of the safetensors headers against the model the configuration builds (on the
meta device), then the weights and optimizer state for finiteness and every training-state field (types,
sizes, finiteness). Anything wrong is a CheckpointError naming the file and the field; nothing is written.

A run directory of the earlier layout holds the four files directly, without a manifest: it still loads,
with every check but the checksums.
"""

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .config import ConfigError, from_dict, to_dict, validate
from .files import CHUNK, fsync_dir, open_regular, read_bounded, write_new

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
MANIFEST = "manifest.json"
SAVES = "checkpoints"  # the folder of the saves in a run directory
KEEP = 2  # complete saves kept: the newest, and the one before it in case the newest is damaged later
SAVE_NAME = re.compile(r"step-(\d+)")
TEMPORARY = re.compile(r"step-\d+\.(tmp|old)-[A-Za-z0-9_]+")  # a save being written, or being deleted
MAX_JSON_BYTES = 64 << 20  # the JSON files hold a configuration and optimizer groups: kilobytes
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}  # fmt: skip


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
    progress: dict[str, type] = field(default_factory=dict)  # train_state.json's numbers >= 0 (tokens, time...)

    def model_of(self, ckpt: "Checkpoint", device: torch.device | str = "cpu") -> torch.nn.Module:
        """The model of a checkpoint with its weights, in eval mode on `device`."""
        model = self.build_model(ckpt.config)
        model.load_state_dict(ckpt.model)
        return model.to(device).eval()


@dataclass
class Checkpoint:
    directory: Path  # the save's own directory
    step: int
    config: object  # the App's configuration
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None  # {"state": {fqn: {name: tensor}}, "param_groups": [...]}
    rng: dict[str, torch.Tensor] | None = None  # "cpu.<rank>" / "cuda.<rank>" -> state
    state: dict | None = None  # train_state.json


# --- where the saves are --------------------------------------------------------------------------


def save_name(step: int) -> str:
    return f"step-{step:06d}"


def saves(out_dir: Path) -> list[tuple[int, Path]]:
    """The complete saves of a run directory, (step, directory), oldest first."""
    root = out_dir / SAVES
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := SAVE_NAME.fullmatch(p.name)) and not p.is_symlink()]
    return sorted(found)


def flat_files(directory: Path) -> bool:
    """Whether `directory` holds checkpoint files directly (a save, or a run of the earlier layout)."""
    return any(os.path.lexists(directory / name) for name in (*FILES, MANIFEST))


def exists(out_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint (interrupted saves do not count)."""
    return bool(saves(out_dir)) or flat_files(out_dir)


def locate(path: Path) -> Path:
    """The save that `path` names: the last complete save of a run directory, or `path` itself when it holds
    the files (one save directory, or a run directory of the earlier layout)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    found = saves(path)
    if found:
        return found[-1][1]
    if (path / SAVES).is_dir() and not flat_files(path):
        raise CheckpointError(
            f"{path} holds no complete checkpoint: {path / SAVES} has only interrupted saves (the first save of "
            f"the run was stopped); train again without --resume"
        )
    return path


def latest_step(out_dir: Path) -> int:
    """The step of the last complete save in a run directory, 0 if none."""
    found = saves(out_dir)
    return found[-1][0] if found else 0


def remove_stale(out_dir: Path) -> list[str]:
    """Delete the temporaries that interrupted saves left in `out_dir` (only names a save gives them); their
    names. Called when a run starts, in the one process that writes."""
    root = out_dir / SAVES
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if TEMPORARY.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
    return removed


# --- writing --------------------------------------------------------------------------------------


def json_bytes(obj, allow_nan: bool = True) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n").encode()


def discard(save: Path) -> None:
    """Delete a save: first renamed to a temporary name (one atomic step), so a kill while deleting leaves a
    temporary, never a half-deleted save under a save's name."""
    trash = tempfile.mkdtemp(prefix=f"{save.name}.old-", dir=save.parent)
    os.rename(save, trash)  # onto the empty directory mkdtemp made
    shutil.rmtree(trash)


def save_contents(app: App, step: int, config, model: dict, optimizer: dict, rng: dict, state: dict) -> dict:
    """The bytes of each file of a save, the manifest (their sizes and SHA-256) last."""
    meta = {"format": str(FORMAT), "step": str(step)}
    weights = {name: t.detach().contiguous() for name, t in model.items()}
    record = {"format": FORMAT, "step": step, "task": app.task, "config": to_dict(config)}
    tensors = {
        f"optimizer.{fqn}.{name}": t.contiguous() for fqn, s in optimizer["state"].items() for name, t in s.items()
    }
    tensors.update({f"rng.{key}": t.contiguous() for key, t in rng.items()})
    contents = {
        MODEL: safetensors_bytes(weights, metadata=meta),
        CONFIG: json_bytes(record, allow_nan=False),
        STATE_TENSORS: safetensors_bytes(tensors, metadata=meta),
        STATE_JSON: json_bytes(
            {"format": FORMAT, "step": step, **state, "param_groups": optimizer["param_groups"]}, allow_nan=False
        ),
    }
    files = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in contents.items()}
    contents[MANIFEST] = json_bytes({"format": FORMAT, "step": step, "task": app.task, "files": files,
                                     "config": record["config"]})  # fmt: skip
    return contents


def save(
    out_dir: Path,
    app: App,
    *,
    step: int,
    config,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict[str, torch.Tensor],
    state: dict,
) -> Path:
    """Write the save of `step` into `out_dir`/checkpoints and return its directory; `state` holds JSON-able
    training progress (tokens, elapsed, ...). The tensors must be finite (the training loop checks)."""
    root = out_dir / SAVES
    final, tmp = root / save_name(step), None
    try:
        contents = save_contents(app, step, config, model, optimizer, rng, state)
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=root))
        for name, data in contents.items():  # the manifest last
            write_new(tmp / name, data)
        fsync_dir(tmp)
        if final.exists():  # a save of this step from an earlier attempt
            discard(final)
        os.rename(tmp, final)
        fsync_dir(root)
        for _, old in saves(out_dir)[:-KEEP]:
            discard(old)
    except (OSError, ValueError) as e:  # ValueError: a non-finite number in the JSON-able state
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_step(out_dir)
        kept = f"the save of step {last} is kept" if last else "no earlier save exists"
        raise CheckpointError(f"cannot write the checkpoint of step {step} in {root} ({e}); {kept}") from None
    return final


# --- reading and checking -------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(read_bounded(path, MAX_JSON_BYTES))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read {path} ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint file of format {FORMAT}")
    if not is_int(obj.get("step")) or obj["step"] < 0:
        raise CheckpointError(f"{path}: field 'step' must be an integer >= 0, got {obj.get('step')!r}")
    return obj


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sha256_of(path: Path) -> tuple[int, str]:
    """The size and SHA-256 of a regular file, read in chunks (memory stays bounded)."""
    digest, size = hashlib.sha256(), 0
    with open_regular(path) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory} is not a complete checkpoint: missing {MANIFEST}")
    manifest = read_json(path)
    files = manifest.get("files")
    entries_ok = isinstance(files, dict) and set(files) == set(FILES)
    entries_ok = entries_ok and all(
        isinstance(f, dict) and is_int(f.get("bytes")) and isinstance(f.get("sha256"), str) for f in files.values()
    )
    if not entries_ok or not isinstance(manifest.get("config"), dict) or not isinstance(manifest.get("task"), str):
        raise CheckpointError(f"{path}: files, task or config missing or malformed")
    return manifest


def verify(directory: Path, manifest: dict, names: tuple[str, ...]) -> None:
    """The files `names` must be those the manifest lists: the same size and SHA-256."""
    for name in names:
        path, expected = directory / name, manifest["files"][name]
        try:
            size, digest = sha256_of(path)
        except FileNotFoundError:
            raise CheckpointError(f"{directory} is not a complete checkpoint: missing {name}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {path} ({e})") from None
        if size != expected["bytes"] or digest != expected["sha256"]:
            raise CheckpointError(
                f"{path} is damaged: {size:,} bytes with SHA-256 {digest[:16]}, where the manifest says "
                f"{expected['bytes']:,} bytes with SHA-256 {expected['sha256'][:16]}"
            )


def read_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...]]]]:
    """The step in a safetensors file's metadata and its tensors' dtypes and shapes, without reading the data."""
    try:
        open_regular(path).close()
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {}
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                tensor = f.get_slice(name)
                shapes[name] = (tensor.get_dtype(), tuple(tensor.get_shape()))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {e}") from None
    if meta.get("format") != str(FORMAT) or not meta.get("step", "").isdigit():
        raise CheckpointError(f"{path} is not a checkpoint file of format {FORMAT}")
    return int(meta["step"]), shapes


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose header was checked; floating ones must be finite."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {e}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            count = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: {name} holds {count:,} non-finite values (NaN or infinity)")
    return tensors


def describe(label: str, items: list[str]) -> str:
    return f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"


def check_weights(shapes: dict[str, tuple], app: App, cfg, path: Path) -> dict[str, tuple]:
    """The weights must be exactly those of the model that `cfg` builds: names, shapes and dtypes. The model is
    built on the meta device (no memory), after `validate` bounded its size. Returns the expected (dtype, shape)."""
    try:
        validate(cfg)
        with torch.device("meta"):
            built = app.build_model(cfg).state_dict()
    except ConfigError as e:
        raise CheckpointError(f"{path.parent / CONFIG}: {e}") from None
    expected = {name: (SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for name, t in built.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        f"{name} {shapes[name][1]} {shapes[name][0]} (expected {shape} {dtype})"
        for name, (dtype, shape) in expected.items()
        if name in shapes and shapes[name] != (dtype, shape)
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            describe(label, items)
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise CheckpointError(f"{path} does not fit the model of {path.parent / CONFIG}: {details}")
    return expected


def read_record(directory: Path, needed: tuple[str, ...] = (MODEL, CONFIG)) -> dict:
    """config.json of a save directory holding the files `needed`."""
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a complete checkpoint: missing {', '.join(missing)}")
    record = read_json(directory / CONFIG)
    if not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{directory / CONFIG} holds no configuration")
    return record


def task_of(path: Path) -> str:
    """The application that wrote the checkpoint at `path` (a run or save directory)."""
    return read_record(locate(path)).get("task", UNNAMED_TASK)


def load(path: Path, app: App, training: bool = False) -> Checkpoint:
    """Read and check the checkpoint at `path` (a run directory: its last complete save; or a save directory) of
    `app`; `training` also reads the optimizer and RNG state (for --resume). A refusal names the save before it,
    if one is kept, and how to fall back to it."""
    directory = locate(path)
    try:
        return load_save(directory, app, training)
    except CheckpointError as e:
        kept = [save for _, save in saves(directory.parent.parent)] if directory.parent.name == SAVES else []
        earlier = kept[: kept.index(directory)] if directory in kept else []
        if not earlier:
            raise
        raise CheckpointError(f"{e}. The save before it is kept: move {directory} out of {directory.parent} to "
                              f"go back to {earlier[-1].name}") from None  # fmt: skip


def load_save(directory: Path, app: App, training: bool) -> Checkpoint:
    needed = FILES if training else (MODEL, CONFIG)
    earlier_layout = directory.parent.name != SAVES and not os.path.lexists(directory / MANIFEST)
    manifest = None if earlier_layout else read_manifest(directory)
    if manifest:
        verify(directory, manifest, needed)
    record = read_record(directory, needed)
    task = record.get("task", UNNAMED_TASK)
    if manifest and (record["config"], record["step"], task) != (manifest["config"], manifest["step"],
                                                                 manifest["task"]):  # fmt: skip
        raise CheckpointError(f"{directory / CONFIG} does not match {directory / MANIFEST} (edited?)")
    if task != app.task:
        raise CheckpointError(f"{directory / CONFIG} is a {task} checkpoint, not one of {app.command}")
    try:
        values = app.upgrade(record["config"]) if app.upgrade else record["config"]
        cfg = from_dict(app.config, values, str(directory / CONFIG))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(str(e)) from None
    steps = {CONFIG: record["step"]}
    steps[MODEL], shapes = read_header(directory / MODEL)
    expected = check_weights(shapes, app, cfg, directory / MODEL)
    if training:
        state = read_json(directory / STATE_JSON)
        steps[STATE_JSON] = state["step"]
        steps[STATE_TENSORS], state_shapes = read_header(directory / STATE_TENSORS)
    if len(set(steps.values())) > 1:
        found = ", ".join(f"{name} step {step}" for name, step in steps.items())
        raise CheckpointError(f"{directory} mixes files of different saves ({found}): the last save was interrupted")
    ckpt = Checkpoint(directory, record["step"], cfg, read_tensors(directory / MODEL))
    if training:
        check_state(state, app, expected, directory / STATE_JSON)
        check_state_tensors(state_shapes, state, expected, directory / STATE_TENSORS)
        ckpt.state = state
        ckpt.optimizer, ckpt.rng = unflatten_state(read_tensors(directory / STATE_TENSORS), state["param_groups"])
    return ckpt


# --- the training state ---------------------------------------------------------------------------


def finite_numbers(value) -> bool:
    """Whether every number in a JSON value (nested lists included) is finite; bools, strings and None pass."""
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def check_state(state: dict, app: App, weights: dict, path: Path) -> None:
    """Every field of train_state.json: progress numbers, world size and optimizer groups."""

    def refuse(name: str, expected: str) -> None:
        raise CheckpointError(f"{path}: field {name!r} must be {expected}, got {state.get(name)!r}")

    for name, kind in app.progress.items():
        value = state.get(name)
        if name in state and not (
            (is_int(value) if kind is int else isinstance(value, (int, float)) and not isinstance(value, bool))
            and math.isfinite(value)
            and value >= 0
        ):
            refuse(name, f"{'an integer' if kind is int else 'a finite number'} >= 0")
    if "world_size" in state and not (is_int(state["world_size"]) and 1 <= state["world_size"] <= 1 << 20):
        refuse("world_size", "a positive integer")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        refuse("param_groups", "a list of optimizer groups")
    names = [name for g in groups for name in (g.get("params") if isinstance(g.get("params"), list) else [None])]
    if any(not isinstance(n, str) or n not in weights for n in names) or len(set(names)) != len(names):
        refuse("param_groups", "groups whose 'params' name each weight of the model at most once")
    for i, group in enumerate(groups):
        for key, value in group.items():
            if key != "params" and not finite_numbers(value):
                raise CheckpointError(f"{path}: field 'param_groups' group {i} {key!r} is not finite: {value!r}")


def check_state_tensors(shapes: dict[str, tuple], state: dict, weights: dict, path: Path) -> None:
    """train_state.safetensors: each optimizer tensor belongs to a weight (its shape and dtype, or a scalar
    `step`), each RNG state has the size of this torch's generator, one per process."""
    rng_sizes = {"cpu": torch.get_rng_state().numel(), "cuda": 16}  # CUDA's Philox state: seed and offset
    wrong, ranks = [], set()
    for key, (dtype, shape) in shapes.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            device, _, rank = rest.partition(".")
            if device not in rng_sizes or not rank.isdigit() or (dtype, shape) != ("U8", (rng_sizes[device],)):
                wrong.append(f"{key} {dtype} {shape} (expected U8 ({rng_sizes.get(device, '?')},))")
            elif device == "cpu":
                ranks.add(int(rank))
            continue
        fqn, _, name = rest.rpartition(".")
        expected = ("F32", ()) if name == "step" else weights.get(fqn)
        if kind != "optimizer" or fqn not in weights or (dtype, shape) != expected:
            wrong.append(f"{key} {dtype} {shape} (expected {expected or 'no such weight'})")
    if wrong:
        raise CheckpointError(f"{path} holds tensors that do not fit the model of {path.parent / CONFIG}: "
                              f"{describe('wrong', wrong)}")  # fmt: skip
    world_size = state.get("world_size")
    if world_size is not None and ranks != set(range(world_size)):
        raise CheckpointError(f"{path}: the CPU random states of processes {sorted(ranks)} do not match "
                              f"world_size {world_size} in {path.parent / STATE_JSON}")  # fmt: skip


def unflatten_state(tensors: dict, groups: list) -> tuple[dict, dict]:
    """The optimizer state dict and RNG states of checked train_state tensors."""
    optimizer = {"state": {}, "param_groups": groups}
    rng = {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            rng[rest] = t
        else:
            fqn, _, name = rest.rpartition(".")
            optimizer["state"].setdefault(fqn, {})[name] = t
    return optimizer, rng
