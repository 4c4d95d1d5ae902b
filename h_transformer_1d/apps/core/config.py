"""Run configurations: one frozen dataclass per application, whose fields carry their flag's help, group and checks.

From the fields come the command-line flags, the keys of a TOML file (`--config`), the validation and the
JSON stored in checkpoints. Precedence: the application's defaults (or preset) < TOML file < flags; on
`--resume` the checkpoint's configuration takes the defaults' place, and a change to the model is refused.

A field both applications have is declared with `shared(name, default)`: one name, one help text and one
check for one idea, so the two tools speak the same flags.
"""

import argparse
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the flag and the expected value."""


@dataclass(frozen=True)
class Check:
    """A condition on a field's value and the words that say what it must be."""

    ok: Callable[[object], bool]
    expected: str


POSITIVE = Check(lambda v: v >= 1, "a positive integer")
NON_NEGATIVE = Check(lambda v: v >= 0, "an integer >= 0")
POSITIVE_NUMBER = Check(lambda v: v > 0, "a number > 0")
NON_NEGATIVE_NUMBER = Check(lambda v: v >= 0, "a number >= 0")
PROBABILITY = Check(lambda v: 0 <= v < 1, "in [0, 1)")
EVEN = Check(lambda v: v % 2 == 0, "even (rotary position embeddings rotate pairs of features)")
POWER_OF_TWO = Check(lambda v: v >= 2 and not v & (v - 1), "a power of two >= 2")


def at_most(limit: int) -> Check:
    """An upper bound far above any model this code trains: a value above it is a typo or an edited
    checkpoint, refused before the model is built (depth 10**6 would take minutes to build)."""
    return Check(lambda v: v <= limit, f"at most {limit:,}")


# The largest --data read, after decompression. 2 GiB holds enwik9 (10**9 bytes), the largest corpus the
# byte-level benchmarks use, while the bytes held in memory (once, as uint8) stay a fraction of a training
# machine's; a larger corpus is read by raising it.
MAX_DATA_BYTES = 2 << 30

GROUPS = {
    "model": "model (fixed for the life of a checkpoint)",
    "optimization": "optimization",
    "data": "data",
    "evaluation": "evaluation and checkpoints",
    "system": "system",
}
ATTENTIONS = ("hierarchical", "dense")
PRECISIONS = ("auto", "bf16", "fp32")


def option(default, help: str, group: str, *, choices: tuple | None = None, checks: tuple[Check, ...] = ()):
    """A configuration field: its default, flag help, help group, allowed values and checks."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "checks": checks})


# The ideas both applications configure: name -> (help, group, checks, choices).
# fmt: off
SHARED = {
    "dim": ("model width", "model", (POSITIVE, at_most(1 << 16)), None),
    "depth": ("number of layers", "model", (POSITIVE, at_most(1024)), None),
    "heads": ("attention heads", "model", (POSITIVE, at_most(1024)), None),
    "dim_head": ("width of one attention head (even)", "model", (POSITIVE, EVEN, at_most(1 << 12)), None),
    "kv_heads": ("key and value heads, dividing --heads (grouped-query attention; 1: multi-query; 0: --heads)",
                 "model", (NON_NEGATIVE, at_most(1024)), None),
    "block_size": ("hierarchical attention block size Nr (a power of two >= 2)", "model",
                   (POWER_OF_TWO, at_most(1 << 16)), None),
    "seq_len": ("longest sequence in tokens (the model's max_seq_len)", "model", (POSITIVE, at_most(1 << 24)), None),
    "ff_mult": ("feed-forward width as a multiple of --dim", "model", (POSITIVE, at_most(64)), None),
    "attention": ("attention kind", "model", (), ATTENTIONS),
    "batch_size": ("sequences per optimizer step", "optimization", (POSITIVE,), None),
    "steps": ("optimizer steps in the whole run", "optimization", (POSITIVE,), None),
    "lr": ("peak learning rate, reached at the end of the warmup", "optimization", (POSITIVE_NUMBER,), None),
    "warmup_steps": ("linear learning-rate warmup steps", "optimization", (NON_NEGATIVE,), None),
    "weight_decay": ("decoupled (AdamW) weight decay on matrices and embeddings", "optimization",
                     (NON_NEGATIVE_NUMBER,), None),
    "grad_clip": ("clip the gradient norm to this value (0 = off)", "optimization", (NON_NEGATIVE_NUMBER,), None),
    "dropout": ("dropout in the feed-forward layers", "optimization", (PROBABILITY,), None),
    "attn_dropout": ("dropout on the attention weights (non-zero leaves the fused GPU kernels for blocked PyTorch)",
                     "optimization", (PROBABILITY,), None),
    "max_data_bytes": ("the most bytes --data may hold after decompression (2 GiB by default); more is refused",
                       "data", (POSITIVE,), None),
    "seed": ("seed for initialization and for the batches", "data", (NON_NEGATIVE,), None),
    "eval_every": ("validate and save a checkpoint every N steps (and at the last)", "evaluation", (POSITIVE,), None),
    "device": ("auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps", "system", (), None),
    "precision": ("auto = bf16 autocast on GPUs that support it, else fp32", "system", (), PRECISIONS),
}
# fmt: on


def shared(name: str, default, note: str = ""):
    """The field of a shared idea (see SHARED); `note` adds what is particular to one application."""
    help, group, checks, choices = SHARED[name]
    return option(default, help + (f"; {note}" if note else ""), group, choices=choices, checks=checks)


def body_kwargs(cfg) -> dict:
    """The `HTransformer1D` arguments of the fields every tool declares with `shared` (the model body)."""
    return {
        "dim": cfg.dim,
        "depth": cfg.depth,
        "max_seq_len": cfg.seq_len,
        "heads": cfg.heads,
        "dim_head": cfg.dim_head,
        "kv_heads": cfg.kv_heads or None,
        "block_size": cfg.block_size,
        "ff_mult": cfg.ff_mult,
        "attn_dropout": cfg.attn_dropout,
        "ff_dropout": cfg.dropout,
        "attention": cfg.attention,
    }


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def model_fields(cls) -> tuple[str, ...]:
    return tuple(name for name, f in fields_of(cls).items() if f.metadata["group"] == "model")


def default_values(name: str, presets: dict) -> str:
    values = {preset: getattr(cfg, name) for preset, cfg in presets.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f"default {next(iter(values.values()))}"
    return ", ".join(f"{preset}: {value}" for preset, value in values.items())


def add_field_flag(parser, cls, name: str, presets: dict | None = None) -> None:
    """The flag of one field. Absent from the command line, it leaves no attribute (argparse.SUPPRESS), so
    what was given can be told from what was not (`given`). `presets` name the defaults shown in the help."""
    f = fields_of(cls)[name]
    presets = presets or {"default": cls()}
    shown = f" ({default_values(name, presets)})" if f.default is not None else ""
    kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"] + shown}
    if f.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.metadata["choices"]:
        kwargs["choices"] = f.metadata["choices"]
    else:
        kwargs["type"] = {int: int, float: float}.get(f.type, str)
        kwargs["metavar"] = {int: "N", float: "X"}.get(f.type, "PATH" if name == "data" else "NAME")
    parser.add_argument(flag(name), **kwargs)


def add_config_flags(parser: argparse.ArgumentParser, cls, groups=tuple(GROUPS), presets: dict | None = None) -> None:
    """One flag per field of `cls` in `groups`, in one argument group each."""
    for group in groups:
        arg_group = parser.add_argument_group(GROUPS[group])
        for name, f in fields_of(cls).items():
            if f.metadata["group"] == group:
                add_field_flag(arg_group, cls, name, presets)


def given(args: argparse.Namespace, cls) -> dict:
    """The configuration fields given on the command line, plus `preset` and `config` (the TOML path) if given."""
    names = set(fields_of(cls)) | {"preset", "config"}
    return {k: v for k, v in vars(args).items() if k in names}


def check_type(cls, name: str, value, where: str):
    """Coerce a TOML or JSON value to the field's type; refuse anything else."""
    kind = fields_of(cls)[name].type
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


def read_toml(path: str, cls, extra: tuple[str, ...] = ()) -> dict:
    """The values of a TOML file (keys as the flags, with '-' or '_'); `extra` keys (e.g. `preset`) pass as given."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    names = fields_of(cls)
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in extra:
            values[name] = value
        elif name in names:
            values[name] = check_type(cls, name, value, f"--config {path}")
        else:
            raise ConfigError(f"--config {path}: unknown key {key!r} (known: {', '.join((*extra, *names))})")
    return values


def overrides(cls, flags: dict, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The field values of the TOML file `flags["config"]` with the flags' over them, and the `extra` keys
    (e.g. `preset`) found in the TOML file."""
    file_values = read_toml(flags["config"], cls, extra) if flags.get("config") else {}
    found = {k: file_values.pop(k) for k in extra if k in file_values}
    names = fields_of(cls)
    return {**file_values, **{k: v for k, v in flags.items() if k in names}}, found


def validate(cfg) -> None:
    """Every field's allowed values and checks; the message names the flag."""
    for name, f in fields_of(type(cfg)).items():
        value = getattr(cfg, name)
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}, got {value!r}")
        for check in f.metadata["checks"]:
            if not check.ok(value):
                raise ConfigError(f"{flag(name)} must be {check.expected}, got {value!r}")
    kv_heads, heads = getattr(cfg, "kv_heads", 0), getattr(cfg, "heads", 0)
    if kv_heads and heads % kv_heads:
        raise ConfigError(f"{flag('kv_heads')} must divide {flag('heads')} = {heads} (or be 0), got {kv_heads}")


def check_same_model(stored, requested, where: str) -> None:
    """A resumed run must keep its model; name every flag that would change it, with both values."""
    diffs = [
        f"{name}={getattr(stored, name)!r} (asked: {flag(name)} {getattr(requested, name)!r})"
        for name in model_fields(type(stored))
        if getattr(stored, name) != getattr(requested, name)
    ]
    if diffs:
        raise ConfigError(f"{where} holds a different model: {'; '.join(diffs)}. Drop those flags or use a new --out")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict, where: str):
    """The configuration stored in a checkpoint."""
    names = fields_of(cls)
    unknown, missing = sorted(set(values) - set(names)), sorted(set(names) - set(values))
    if unknown or missing:
        raise ConfigError(f"{where}: not a configuration of this version (unknown keys {unknown}, missing {missing})")
    return cls(**{name: check_type(cls, name, value, where) for name, value in values.items()})
