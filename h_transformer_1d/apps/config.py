"""Run configuration: one dataclass, its presets, a TOML file and command-line flags.

Precedence: preset < TOML file (`--config`) < flags. On `--resume` the checkpoint's own configuration
takes the preset's place, and a change to the model's shape is refused.
"""

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NUM_TOKENS = 256  # byte-level vocabulary


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the flag and the expected value."""


def _opt(default, help: str, group: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


GROUPS = {
    "model": "model (fixed for the life of a checkpoint)",
    "optimization": "optimization",
    "data": "data",
    "evaluation": "evaluation, samples and checkpoints",
    "system": "system",
}


@dataclass(frozen=True)
class Config:
    """Everything a run needs. The defaults are the `tiny` preset."""

    dim: int = _opt(192, "model width", "model")
    depth: int = _opt(4, "number of layers", "model")
    heads: int = _opt(4, "attention heads", "model")
    dim_head: int = _opt(48, "width of one attention head (even)", "model")
    block_size: int = _opt(32, "hierarchical attention block size Nr (a power of two >= 2)", "model")
    seq_len: int = _opt(256, "training context in bytes (the model's max_seq_len)", "model")
    ff_mult: int = _opt(4, "feed-forward width as a multiple of --dim", "model")
    shift_tokens: bool = _opt(True, "shift half the features by one position before each layer", "model")
    reversible: bool = _opt(False, "reversible layers: activation memory independent of depth, slower", "model")
    attention: str = _opt("hierarchical", "attention kind", "model", ("hierarchical", "dense"))

    batch_size: int = _opt(8, "sequences per optimizer step, summed over processes and accumulation", "optimization")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (gradient accumulation)", "optimization")
    lr: float = _opt(2e-3, "peak learning rate (AdamW); cosine decay to lr/10 after warmup", "optimization")
    warmup_steps: int = _opt(20, "linear learning-rate warmup steps", "optimization")
    max_steps: int = _opt(500, "optimizer steps in the whole run", "optimization")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices and embeddings", "optimization")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = off)", "optimization")
    dropout: float = _opt(0.0, "dropout in attention and feed-forward layers", "optimization")

    data: str | None = _opt(
        None,
        "text file, .gz, .zip holding one file, or a directory of text files; "
        "default: this Python's standard library sources",
        "data",
    )
    seed: int = _opt(0, "seed for initialization and for the batches (which depend on seed and step only)", "data")

    eval_every: int = _opt(50, "validate (bits per byte) and save a checkpoint every N steps", "evaluation")
    eval_batches: int = _opt(8, "validation batches (each --batch-size / --grad-accum sequences)", "evaluation")
    sample_every: int = _opt(250, "print a generated sample every N steps (0 = never)", "evaluation")
    sample_length: int = _opt(200, "bytes per printed sample", "evaluation")

    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:N, ...", "system")
    precision: str = _opt(
        "auto", "auto = bf16 autocast on GPUs that support it, else fp32", "system", ("auto", "bf16", "fp32")
    )
    compile: bool = _opt(False, "torch.compile the model", "system")
    fsdp: bool = _opt(False, "shard parameters, gradients and optimizer state over processes (FSDP2)", "system")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
MODEL_FIELDS = tuple(name for name, f in FIELDS.items() if f.metadata["group"] == "model")

PRESETS = {
    "tiny": Config(),
    # the seed README model, for a GPU
    "base": Config(
        dim=512,
        depth=12,
        heads=8,
        dim_head=64,
        block_size=128,
        seq_len=8192,
        batch_size=8,
        lr=4e-4,
        warmup_steps=1000,
        max_steps=20000,
        eval_every=500,
        eval_batches=16,
        sample_every=2000,
        sample_length=512,
    ),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def preset_values(name: str) -> str:
    values = {preset: getattr(cfg, name) for preset, cfg in PRESETS.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {next(iter(values.values()))}"
    return ", ".join(f"{preset}: {value}" for preset, value in values.items())


def add_field_flag(parser, name: str) -> None:
    """The flag of one Config field; absent on the command line, it leaves no attribute (argparse.SUPPRESS)."""
    f = FIELDS[name]
    presets = f" ({preset_values(name)})" if f.default is not None else ""
    kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"] + presets}
    if f.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.metadata["choices"]:
        kwargs["choices"] = f.metadata["choices"]
    else:
        kwargs["type"] = {int: int, float: float}.get(f.type, str)
        kwargs["metavar"] = {int: "N", float: "X"}.get(f.type, "PATH" if name == "data" else "NAME")
    parser.add_argument(flag(name), **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, groups=tuple(GROUPS)) -> None:
    """One flag per Config field of `groups`, in one argument group each."""
    for group in groups:
        arg_group = parser.add_argument_group(GROUPS[group])
        for name, f in FIELDS.items():
            if f.metadata["group"] == group:
                add_field_flag(arg_group, name)


def check_type(name: str, value, where: str):
    """Coerce a TOML or JSON value to the field's type; refuse anything else."""
    kind = FIELDS[name].type
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, value is None or isinstance(value, str))
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, "a path")
        raise ConfigError(f"{where}: {name} must be {expected}, got {value!r}")
    return float(value) if kind is float else value


def read_toml(path: str) -> dict:
    """The Config values (and optionally `preset`) of a TOML file; keys may use '-' or '_'."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name == "preset":
            values[name] = value
        elif name in FIELDS:
            values[name] = check_type(name, value, f"--config {path}")
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r} (known: preset, {', '.join(FIELDS)})")
    return values


def resolve(flags: dict, stored: Config | None = None) -> tuple[Config, str | None]:
    """The Config of a run and its preset name, from explicit flags and, on --resume, the stored Config.

    `flags` holds only what was given: `preset`, `config` (a TOML path) and Config fields.
    """
    file_values = read_toml(flags["config"]) if flags.get("config") else {}
    preset = flags.get("preset", file_values.pop("preset", None))
    if stored is not None and preset is not None:
        raise ConfigError(
            "--preset cannot be combined with --resume: the checkpoint's configuration is used; "
            "override single values with flags"
        )
    if stored is None:
        preset = preset or "tiny"
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    base = stored if stored is not None else PRESETS[preset]
    overrides = {**file_values, **{k: v for k, v in flags.items() if k in FIELDS}}
    return dataclasses.replace(base, **overrides), preset


def validate(cfg: Config, world_size: int = 1) -> None:
    def fail(name: str, expected: str):
        raise ConfigError(f"{flag(name)} must be {expected}, got {getattr(cfg, name)!r}")

    for name in ("dim", "depth", "heads", "dim_head", "seq_len", "ff_mult", "batch_size", "grad_accum",
                 "max_steps", "eval_every", "eval_batches", "sample_length"):  # fmt: skip
        if getattr(cfg, name) < 1:
            fail(name, "a positive integer")
    for name in ("warmup_steps", "sample_every", "seed"):
        if getattr(cfg, name) < 0:
            fail(name, "an integer >= 0")
    if cfg.dim_head % 2:
        fail("dim_head", "even (rotary position embeddings rotate pairs of features)")
    if cfg.block_size < 2 or cfg.block_size & (cfg.block_size - 1):
        fail("block_size", "a power of two >= 2")
    if not cfg.lr > 0:
        fail("lr", "a number > 0")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(cfg, name) >= 0:
            fail(name, "a number >= 0")
    if not 0 <= cfg.dropout < 1:
        fail("dropout", "in [0, 1)")
    for name in ("attention", "precision"):
        if getattr(cfg, name) not in FIELDS[name].metadata["choices"]:
            fail(name, f"one of {', '.join(FIELDS[name].metadata['choices'])}")
    if cfg.batch_size % (cfg.grad_accum * world_size):
        raise ConfigError(
            f"--batch-size must be divisible by --grad-accum x processes = {cfg.grad_accum} x {world_size} "
            f"= {cfg.grad_accum * world_size}, got {cfg.batch_size}"
        )


def check_same_model(stored: Config, requested: Config, where: str) -> None:
    """A resumed run must keep the model's shape; name every field that differs."""
    diffs = [
        f"{name}={getattr(stored, name)!r} (asked: {flag(name)} {getattr(requested, name)!r})"
        for name in MODEL_FIELDS
        if getattr(stored, name) != getattr(requested, name)
    ]
    if diffs:
        raise ConfigError(f"{where} holds a different model: {'; '.join(diffs)}. Drop those flags or use a new --out")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict, where: str) -> Config:
    unknown = sorted(set(values) - set(FIELDS))
    missing = sorted(set(FIELDS) - set(values))
    if unknown or missing:
        raise ConfigError(f"{where}: not a configuration of this version (unknown keys {unknown}, missing {missing})")
    return Config(**{name: check_type(name, value, where) for name, value in values.items()})


def build_model(cfg: Config):
    """The causal byte-level language model of `cfg`, wrapped for next-token loss and sampling."""
    from ..model import AutoregressiveWrapper, HTransformer1D

    try:
        net = HTransformer1D(
            num_tokens=NUM_TOKENS,
            dim=cfg.dim,
            depth=cfg.depth,
            max_seq_len=cfg.seq_len,
            causal=True,
            heads=cfg.heads,
            dim_head=cfg.dim_head,
            block_size=cfg.block_size,
            ff_mult=cfg.ff_mult,
            reversible=cfg.reversible,
            shift_tokens=cfg.shift_tokens,
            attn_dropout=cfg.dropout,
            ff_dropout=cfg.dropout,
            attention=cfg.attention,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    return AutoregressiveWrapper(net)
