"""The `h-transformer-1d` command: train, evaluate, generate, bench, lra (also `python -m h_transformer_1d`)."""

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path

from ..model.cache import compiled_steps_refused
from . import data
from .bench import BENCH_FLAGS, UNTIMED_STEPS, bench
from .config import LM, PRESETS, resolve
from .core import checkpoint
from .core.checkpoint import CheckpointError
from .core.cli import (
    add_evaluate_flags,
    add_train_flags,
    checkpoint_help,
    non_negative_float,
    open_run,
    positive_int,
    unit_interval,
)
from .core.config import ConfigError, add_config_flags, add_field_flag, given
from .core.runtime import start_runtime, stop_runtime
from .core.training import DivergedError
from .data import DataError
from .lra.cli import add_commands as add_lra_commands
from .train import evaluate_bpb, generate_text, train

PROG = "h-transformer-1d"
EXAMPLES = """examples:
  h-transformer-1d train                                  # tiny model on the standard library, a few CPU minutes
  h-transformer-1d train --preset base --data enwik8.zip  # the seed README model (GPU)
  h-transformer-1d train --out runs/tiny --resume --steps 1000   # train longer
  torchrun --nproc_per_node 8 -m h_transformer_1d train --preset base --data enwik8.zip
  h-transformer-1d evaluate --checkpoint runs/tiny
  h-transformer-1d generate --checkpoint runs/tiny --prompt 'def main(' --length 200
  h-transformer-1d bench --preset base
  h-transformer-1d lra listops prepare && h-transformer-1d lra listops train   # Long Range Arena ListOps (GPU)
"""


def command_train(args) -> None:
    def resolve_run(flags, stored):
        cfg, preset = resolve(flags, stored)
        return cfg, f"runs/{preset or 'tiny'}"

    cfg, out, ckpt = open_run(LM, args, resolve_run)
    train(cfg, out, ckpt)


def load_model(args):
    """The model of `--checkpoint` on the requested device, and its runtime."""
    ckpt = checkpoint.load(Path(args.checkpoint), LM)
    rt = start_runtime(getattr(args, "device", "auto"), getattr(args, "precision", "auto"))
    return ckpt, LM.model_of(ckpt, rt.device), rt


def command_evaluate(args) -> None:
    ckpt, model, rt = load_model(args)
    try:
        cfg = ckpt.config
        max_bytes = getattr(args, "max_data_bytes", cfg.max_data_bytes)
        corpus = data.load_corpus(getattr(args, "data", cfg.data), max_bytes)
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
    flags = given(args, LM.config)
    cfg, _ = resolve(flags)
    kinds = (cfg.attention,) if "attention" in flags else ("hierarchical", "dense")
    bench(cfg, kinds, args.timed_steps, start_runtime(cfg.device, cfg.precision))


def package_version() -> str:
    """The installed distribution's version; the source tree's when it runs uninstalled."""
    try:
        return metadata.version("h-transformer-1d")
    except metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def add_preset_flag(parser) -> None:
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=argparse.SUPPRESS,
        help="tiny: ~1.9M parameters, minutes on a laptop CPU (default); "
        "base: the seed README model, 12 x 512, context 8192, for a GPU; a TOML --config may name it too",
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
    parser.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "train",
        help="train a model (tiny preset on the standard library by default)",
        formatter_class=formatter,
        description="Train a causal byte-level model. Writes to --out: checkpoints/step-N/ (model.safetensors, "
        "config.json, train_state.*, manifest.json; at every evaluation and at the end, the last 2 kept, each "
        "complete or absent), metrics.csv, curves.png "
        "and tensorboard/ (if tensorboard is installed). Several processes: torchrun --nproc_per_node K "
        "-m h_transformer_1d train ... (DDP; --fsdp to shard). Ctrl-C stops; --resume continues from "
        "the last checkpoint exactly.",
        epilog=EXAMPLES,
    )
    add_preset_flag(p)
    add_train_flags(p, LM, "runs/PRESET", PRESETS)
    p.set_defaults(run=command_train, resumable=True)

    p = commands.add_parser(
        "evaluate",
        help="bits per byte of a checkpoint on the test split",
        description="Print the bits per byte of a checkpoint on a split of its data (every byte of the split, "
        "in non-overlapping windows of the training context, unless --max-batches).",
    )
    add_evaluate_flags(p, LM, ("test", "val", "train"), "windows per forward pass (default: the checkpoint's micro-batch)")
    p.add_argument(
        "--max-batches",
        type=positive_int,
        metavar="N",
        help="evaluate only N batches of windows spread over the split (default: the whole split)",
    )
    p.set_defaults(run=command_evaluate)

    p = commands.add_parser(
        "generate", help="continue a prompt with a checkpoint", description="Print a sampled continuation of --prompt."
    )
    p.add_argument("--checkpoint", metavar="DIR", required=True, help=checkpoint_help(LM))
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
        add_field_flag(p, LM.config, name)
    p.set_defaults(run=command_generate)

    p = commands.add_parser(
        "bench",
        help="training throughput (tokens/s, peak memory) of a preset",
        formatter_class=formatter,
        description="Time a few training steps on random bytes and print tokens/s and peak memory, for hierarchical "
        "and dense attention (or only --attention). The flags are those of train that change the time of a step.",
    )
    add_preset_flag(p)
    p.add_argument("--config", metavar="TOML", default=argparse.SUPPRESS, help="TOML file of settings, as for train")
    p.add_argument("--steps", dest="timed_steps", type=positive_int, default=5, metavar="N",
                   help=f"timed steps, after {UNTIMED_STEPS} untimed ones (default: 5)")  # fmt: skip
    add_config_flags(p, LM.config, ("model",), PRESETS)
    step = p.add_argument_group("the step")
    for name in BENCH_FLAGS:
        add_field_flag(step, LM.config, name, PRESETS)
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
            resume = " (--resume continues from the last checkpoint in --out)" if hasattr(args, "resumable") else ""
            print(f"\n{PROG} {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    return 0
