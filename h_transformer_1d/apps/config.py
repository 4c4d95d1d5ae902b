"""The language model's run configuration: one dataclass, its presets, and the model it builds.

Precedence: preset < TOML file (`--config`) < flags. On `--resume` the checkpoint's own configuration
takes the preset's place (core/config.py).
"""

import dataclasses
from dataclasses import dataclass

from .core.checkpoint import App
from .core.config import (
    MAX_DATA_BYTES,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    body_kwargs,
    flag,
    option,
    overrides,
    shared,
)
from .core.config import validate as validate_fields

NUM_TOKENS = 256  # byte-level vocabulary


@dataclass(frozen=True)
class Config:
    """Everything a run needs. The defaults are the `tiny` preset."""

    dim: int = shared("dim", 192)
    depth: int = shared("depth", 4)
    heads: int = shared("heads", 4)
    dim_head: int = shared("dim_head", 48)
    kv_heads: int = shared("kv_heads", 0)
    block_size: int = shared("block_size", 32)
    seq_len: int = shared("seq_len", 256, "the training context in bytes")
    ff_mult: int = shared("ff_mult", 4)
    shift_tokens: bool = option(True, "shift half the features by one position before each layer", "model")
    reversible: bool = option(False, "reversible layers: activation memory independent of depth, slower", "model")
    attention: str = shared("attention", "hierarchical")

    batch_size: int = shared("batch_size", 8, "summed over processes and accumulation")
    grad_accum: int = option(1, "micro-batches per optimizer step (gradient accumulation)", "optimization",
                             checks=(POSITIVE,))  # fmt: skip
    lr: float = shared("lr", 2e-3, "then cosine decay to lr/10 at --steps")
    warmup_steps: int = shared("warmup_steps", 20)
    steps: int = shared("steps", 500)
    weight_decay: float = shared("weight_decay", 0.1)
    grad_clip: float = shared("grad_clip", 1.0)
    dropout: float = shared("dropout", 0.0)
    attn_dropout: float = shared("attn_dropout", 0.0)

    data: str | None = option(
        None,
        "text file, .gz, .zip holding one file, or a directory of text files; "
        "default: this Python's standard library sources",
        "data",
    )
    max_data_bytes: int = shared("max_data_bytes", MAX_DATA_BYTES)
    pack: bool = option(
        False,
        "train on whole documents (files) packed into --batch-size x --seq-len predicted bytes per step, each "
        "attending only within itself (a longer document cut into --seq-len pieces), instead of random windows",
        "data",
    )
    seed: int = shared("seed", 0, "the batches depend on seed and step only")

    eval_every: int = shared("eval_every", 50, "validation in bits per byte")
    eval_batches: int = option(8, "validation batches (each --batch-size / --grad-accum sequences)", "evaluation",
                               checks=(POSITIVE,))  # fmt: skip
    sample_every: int = option(250, "print a generated sample every N steps (0 = never)", "evaluation",
                               checks=(NON_NEGATIVE,))  # fmt: skip
    sample_length: int = option(200, "bytes per printed sample", "evaluation", checks=(POSITIVE,))

    device: str = shared("device", "auto")
    precision: str = shared("precision", "auto")
    compile: bool = option(False, "torch.compile the model", "system")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state over processes (FSDP2)", "system")


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
        steps=20000,
        eval_every=500,
        eval_batches=16,
        sample_every=2000,
        sample_length=512,
    ),
}


def resolve(flags: dict, stored: Config | None = None) -> tuple[Config, str | None]:
    """The Config of a run and its preset name, from explicit flags and, on --resume, the stored Config.

    `flags` holds only what was given: `preset`, `config` (a TOML path) and Config fields.
    """
    values, found = overrides(Config, flags, extra=("preset",))
    preset = flags.get("preset", found.get("preset"))
    if stored is not None:
        if preset is not None:
            raise ConfigError(
                "--preset cannot be combined with --resume: the checkpoint's configuration is used; "
                "override single values with flags"
            )
        return dataclasses.replace(stored, **values), None
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return dataclasses.replace(PRESETS[preset], **values), preset


def validate(cfg: Config, world_size: int = 1) -> None:
    validate_fields(cfg)
    if cfg.pack and cfg.compile:
        # every step packs other lengths: a compiled model would compile again and again
        raise ConfigError("--pack cannot be combined with --compile (packed steps change shape every step)")
    if cfg.batch_size % (cfg.grad_accum * world_size):
        raise ConfigError(
            f"{flag('batch_size')} must be divisible by --grad-accum x processes = {cfg.grad_accum} x {world_size} "
            f"= {cfg.grad_accum * world_size}, got {cfg.batch_size}"
        )


def build_model(cfg: Config):
    """The causal byte-level language model of `cfg`, wrapped for next-token loss and sampling."""
    from ..model import AutoregressiveWrapper, HTransformer1D

    try:
        net = HTransformer1D(
            num_tokens=NUM_TOKENS,
            causal=True,
            reversible=cfg.reversible,
            shift_tokens=cfg.shift_tokens,
            **body_kwargs(cfg),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid model configuration: {e}") from None
    return AutoregressiveWrapper(net)


def upgrade(values: dict) -> dict:
    """A Config stored by an earlier version: `max_steps` is now `steps`, its `dropout` applied to the
    attention weights too, it read --data of any size, and its keys and values had every head."""
    values = {"max_data_bytes": MAX_DATA_BYTES, "kv_heads": 0, **values}
    if "max_steps" in values:
        values["steps"] = values.pop("max_steps")
    values.setdefault("attn_dropout", values.get("dropout", 0.0))
    return values


LM = App("lm", Config, build_model, "h-transformer-1d train", upgrade, {"tokens": int, "elapsed_s": float})
