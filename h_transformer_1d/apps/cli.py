"""The `h-transformer-1d` command: train, evaluate, generate, bench, lra (also `python -m h_transformer_1d`)."""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ..model.cache import compiled_steps_refused
from . import checkpoint, data
from .bench import bench
from .checkpoint import CheckpointError
from .config import (
    FIELDS,
    PRESETS,
    ConfigError,
    add_config_flags,
    add_field_flag,
    build_model,
    check_same_model,
    resolve,
)
from .data import DataError
from .lra.cli import add_commands as add_lra_commands
from .train import DivergedError, evaluate_bpb, generate_text, start_runtime, stop_runtime, train

PROG = "h-transformer-1d"
EXAMPLES = """examples:
  h-transformer-1d train                                  # tiny model on the standard library, a few CPU minutes
  h-transformer-1d train --preset base --data enwik8.zip  # the seed README model (GPU)
  h-transformer-1d train --out runs/tiny --resume --max-steps 500
  torchrun --nproc_per_node 8 -m h_transformer_1d train --preset base --data enwik8.zip
  h-transformer-1d evaluate --checkpoint runs/tiny
  h-transformer-1d generate --checkpoint runs/tiny --prompt 'def main(' --length 200
  h-transformer-1d bench --preset base
  h-transformer-1d lra listops prepare && h-transformer-1d lra listops train   # Long Range Arena ListOps (GPU)
"""


def command_train(args) -> None:
    flags = given(args)
    if args.resume:
        out = Path(args.out or "runs/tiny")
        ckpt = checkpoint.load(out, training=True)
        cfg, _ = resolve(flags, stored=ckpt.config)
        check_same_model(ckpt.config, cfg, f"--out {out}")
    else:
        ckpt = None
        cfg, preset = resolve(flags)
        out = Path(args.out or f"runs/{preset}")
        if checkpoint.exists(out):
            raise CheckpointError(
                f"--out {out} already holds a checkpoint: pass --resume to continue it, or choose another --out"
            )
    if cfg.data is not None:  # the checkpoint remembers where its data came from
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    train(cfg, out, ckpt)


def load_model(args):
    """The model of `--checkpoint` on the requested device, and its runtime."""
    ckpt = checkpoint.load(Path(args.checkpoint))
    rt = start_runtime(getattr(args, "device", "auto"), getattr(args, "precision", "auto"))
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model)
    return ckpt, model.to(rt.device).eval(), rt


def command_evaluate(args) -> None:
    ckpt, model, rt = load_model(args)
    try:
        cfg = ckpt.config
        corpus = data.load_corpus(getattr(args, "data", cfg.data))
        data.require_bytes(corpus, args.split, cfg.seq_len)
        tokens = corpus.split(args.split)
        batch_size = args.batch_size or max(1, cfg.batch_size // cfg.grad_accum)
        starts = data.eval_starts(tokens, cfg.seq_len, args.max_batches * batch_size if args.max_batches else None)
        bpb = evaluate_bpb(model, tokens, starts, cfg.seq_len, batch_size, rt, progress=True)
        if rt.is_main:
            print(f"{args.split} bits per byte: {bpb:.4f}")
            print(
                f"({len(starts):,} windows of {cfg.seq_len} bytes = {len(starts) * cfg.seq_len:,} predicted bytes "
                f"of {len(tokens):,}; checkpoint {args.checkpoint} at step {ckpt.step}; data: {corpus.name})"
            )
    finally:
        stop_runtime()


def command_generate(args) -> None:
    _, model, rt = load_model(args)
    try:
        if args.compile and (refused := compiled_steps_refused(model.net)):
            raise ConfigError(f"--compile: {refused}")
        prompt = args.prompt.encode() or b"\n"
        text = generate_text(
            model,
            prompt,
            args.length,
            rt,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            compile=args.compile,
        )
    finally:
        stop_runtime()
    if rt.is_main:
        sys.stdout.write(text + "\n")


def command_bench(args) -> None:
    flags = given(args)
    cfg, _ = resolve(flags)
    kinds = (cfg.attention,) if "attention" in flags else ("hierarchical", "dense")
    bench(cfg, kinds, args.steps, start_runtime(cfg.device, cfg.precision))


def given(args) -> dict:
    """The run flags given on the command line (absent ones are no attributes: argparse.SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS or k in ("preset", "config")}


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


def add_run_flags(parser) -> None:
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=argparse.SUPPRESS,
        help="tiny: ~1.9M parameters, minutes on a laptop CPU (default); "
        "base: the seed README model, 12 x 512, context 8192, for a GPU",
    )
    parser.add_argument(
        "--config",
        metavar="TOML",
        default=argparse.SUPPRESS,
        help="TOML file of settings (keys as the flags: dim = 256, seq_len = 512, preset = 'base'); "
        "flags override it, it overrides the preset",
    )


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Byte-level language models with H-Transformer-1D hierarchical attention: "
        "train, evaluate, sample, benchmark.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "train",
        help="train a model (tiny preset on the standard library by default)",
        formatter_class=formatter,
        description="Train a causal byte-level model. Writes to --out: model.safetensors, config.json, "
        "train_state.* (checkpoint at every evaluation and at the end), metrics.csv, curves.png "
        "and tensorboard/ (if tensorboard is installed). Several processes: torchrun --nproc_per_node K "
        "-m h_transformer_1d train ... (DDP; --fsdp to shard). Ctrl-C stops; --resume continues from "
        "the last checkpoint exactly.",
        epilog=EXAMPLES,
    )
    add_run_flags(p)
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/PRESET)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out: weights, optimizer, schedule, step, RNG and data position; "
        "flags may change training settings, never the model's shape",
    )
    add_config_flags(p)
    p.set_defaults(run=command_train)

    p = commands.add_parser(
        "evaluate",
        help="bits per byte of a checkpoint on the test split",
        description="Print the bits per byte of a checkpoint on a split of its data (every byte of the split, "
        "in non-overlapping windows of the training context, unless --max-batches).",
    )
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a directory written by train --out")
    p.add_argument("--split", choices=("test", "val", "train"), default="test", help="which split (default: test)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="windows per forward pass (default: the checkpoint's micro-batch)",
    )
    p.add_argument(
        "--max-batches",
        type=positive_int,
        metavar="N",
        help="evaluate only N batches of windows spread over the split (default: the whole split)",
    )
    for name in ("data", "device", "precision"):
        add_field_flag(p, name)
    p.set_defaults(run=command_evaluate)

    p = commands.add_parser(
        "generate", help="continue a prompt with a checkpoint", description="Print a sampled continuation of --prompt."
    )
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a directory written by train --out")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, the model starts after a newline)")
    p.add_argument("--length", type=positive_int, default=256, metavar="N", help="bytes to generate (default: 256)")
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        metavar="X",
        help="sampling temperature, 0 = greedy (default: 0.8)",
    )
    p.add_argument("--top-k", type=positive_int, metavar="N", help="sample among the N most likely bytes only")
    p.add_argument("--top-p", type=unit_interval, metavar="X", help="nucleus sampling: the smallest set of mass >= X")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through torch.compile'd steps: faster per byte on a GPU after a compilation of seconds to"
        " a minute, worth it for long outputs (on the CPU needs torch >= 2.13)",
    )
    for name in ("device", "precision"):
        add_field_flag(p, name)
    p.set_defaults(run=command_generate)

    p = commands.add_parser(
        "bench",
        help="training throughput (tokens/s, peak memory) of a preset",
        formatter_class=formatter,
        description="Time a few training steps on random bytes and print tokens/s and peak memory, for hierarchical "
        "and dense attention (or only --attention).",
    )
    add_run_flags(p)
    p.add_argument("--steps", type=positive_int, default=5, metavar="N", help="timed steps (default: 5)")
    add_config_flags(p, ("model", "optimization", "system"))
    p.set_defaults(run=command_bench)
    add_lra_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun, only process 0 reports
    try:
        args.run(args)
    except (ConfigError, DataError, CheckpointError, DivergedError) as e:
        if not quiet:
            print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        if not quiet:
            resume = " (--resume continues from the last checkpoint in --out)" if args.command == "train" else ""
            print(f"\n{PROG} {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    return 0
