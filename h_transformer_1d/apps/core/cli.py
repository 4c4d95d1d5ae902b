"""The flags every tool shares and the start of a run from them: a new run, or `--resume` of the one in --out."""

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from . import checkpoint
from .checkpoint import App, CheckpointError
from .config import ConfigError, add_config_flags, add_field_flag, check_same_model, given, validate


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def checkpoint_help(app: App) -> str:
    return f"a run directory written by {app.command} (its last complete save), or one of its checkpoints/step-N"


def check_out(out: Path) -> None:
    """--out must be a directory, or a path where one can be made: no file there or above it."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f": {path} is a file"
                raise ConfigError(f"--out {out} names a file, not a directory{where}; choose another --out")
            return


def add_train_flags(parser, app: App, default_out: str, presets: dict | None = None) -> None:
    """--config, --out, --resume and one flag per configuration field of `app`."""
    parser.add_argument(
        "--config",
        metavar="TOML",
        default=argparse.SUPPRESS,
        help="TOML file of settings (keys as the flags: dim = 256, seq_len = 512); flags override it, it overrides "
        "the defaults",
    )
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default: {default_out})")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out exactly: weights, optimizer, schedule, step, RNG and data position; "
        "flags change its training settings (e.g. --steps to train longer); a flag that would change the model "
        "is refused",
    )
    add_config_flags(parser, app.config, presets=presets)


def add_evaluate_flags(parser, app: App, splits: tuple[str, ...], batch_help: str) -> None:
    """--checkpoint, --split, --batch-size, and the checkpoint's --data, --device and --precision to override."""
    parser.add_argument("--checkpoint", metavar="DIR", required=True, help=checkpoint_help(app))
    parser.add_argument("--split", choices=splits, default="test", help="which split (default: test)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help=batch_help)
    for name in ("data", "max_data_bytes", "device", "precision"):
        add_field_flag(parser, app.config, name)


def open_run(app: App, args: argparse.Namespace, resolve: Callable) -> tuple[object, Path, checkpoint.Checkpoint | None]:
    """The configuration, output directory and (with --resume) checkpoint of `train`.

    `resolve(flags, stored)` makes the configuration from the given flags over `stored` (a checkpoint's
    configuration, or None for a new run) and returns it with the default --out. A resumed run keeps its
    model; a new run never overwrites a checkpoint, and --out must not name a file. A relative --data is
    stored as an absolute path, so the checkpoint still finds its data from another working directory.
    """
    flags = given(args, app.config)
    if args.resume:
        out = Path(args.out or resolve(flags, None)[1])
        check_out(out)
        ckpt = checkpoint.load(out, app, training=True)
        cfg, _ = resolve(flags, ckpt.config)
        check_same_model(ckpt.config, cfg, f"--out {out}")
    else:
        ckpt = None
        cfg, default_out = resolve(flags, None)
        validate(cfg)  # a wrong value is reported before anything is looked up on disk
        out = Path(args.out or default_out)
        check_out(out)
        if checkpoint.exists(out):
            raise CheckpointError(
                f"--out {out} already holds a checkpoint: pass --resume to continue it, or choose another --out"
            )
    if cfg.data is not None:
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    return cfg, out, ckpt
