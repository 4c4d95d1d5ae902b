"""`h-transformer-1d lra listops prepare | train | evaluate`."""

import argparse
import dataclasses
import os
import time
from pathlib import Path

from ..train import format_duration, start_runtime
from . import listops
from .train import FIELDS, ListOpsConfig, accuracy, flag, load_checkpoint, load_split, train

GROUPS = {
    "model": "model",
    "optimization": "optimization",
    "data": "data",
    "evaluation": "evaluation and checkpoints",
    "system": "system",
}
EXAMPLES = """examples:
  h-transformer-1d lra listops prepare --out data/listops        # 96,000 / 2,000 / 2,000 examples, minutes
  h-transformer-1d lra listops train --data data/listops         # LRA's configuration, hierarchical attention (GPU)
  h-transformer-1d lra listops train --data data/listops --attention dense
  h-transformer-1d lra listops evaluate --checkpoint runs/listops-hierarchical
"""


def command_prepare(args) -> None:
    out = Path(args.out)
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    bounds = listops.Bounds(args.max_depth, args.max_args, args.min_length, args.max_length)
    start = time.perf_counter()
    listops.write_splits(out, counts, args.seed, bounds, workers=args.workers, progress=True)
    files = ", ".join(f"{listops.SPLITS[split]} ({count:,})" for split, count in counts.items())
    print(f"wrote {files} to {out} in {format_duration(time.perf_counter() - start)}")


def command_train(args) -> None:
    cfg = ListOpsConfig(**{name: getattr(args, name) for name in FIELDS})
    cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))  # the checkpoint remembers its data
    train(cfg, Path(args.out or f"runs/listops-{cfg.attention}"), resume=args.resume)


def command_evaluate(args) -> None:
    directory = Path(args.checkpoint)
    cfg, model, step = load_checkpoint(directory)
    rt = start_runtime(args.device, args.precision)
    data_dir = Path(args.data or cfg.data)
    split = load_split(data_dir, args.split).to(rt.device)
    result = accuracy(model.to(rt.device), split, cfg, rt, args.batch_size or cfg.batch_size, progress=True)
    print(f"{args.split} accuracy: {result:.4f}")
    print(f"({len(split):,} examples of {data_dir}; checkpoint {directory} at step {step}, {cfg.attention} attention)")


def count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_field_flags(parser) -> None:
    """One flag per ListOpsConfig field, its default the recipe's."""
    for group, title in GROUPS.items():
        arg_group = parser.add_argument_group(title)
        for name, f in FIELDS.items():
            if f.metadata["group"] != group:
                continue
            shown = "%(default).4g" if f.type is float else "%(default)s"
            kwargs = {"dest": name, "default": f.default, "help": f.metadata["help"] + f" (default: {shown})"}
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["type"] = f.type if f.type in (int, float) else str
                kwargs["metavar"] = {int: "N", float: "X"}.get(f.type, "DIR" if name == "data" else "NAME")
            arg_group.add_argument(flag(name), **kwargs)


def add_commands(commands) -> None:
    """The `lra` command and its tasks, under the main parser's `commands`."""
    formatter = argparse.RawDescriptionHelpFormatter
    lra = commands.add_parser(
        "lra",
        help="Long Range Arena tasks: ListOps (make the data, train, evaluate)",
        description="Long Range Arena (Tay et al., 2021) tasks with the non-causal model and a classifier head.",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    tasks = lra.add_subparsers(dest="task", required=True, metavar="TASK", help="listops")
    task = tasks.add_parser(
        "listops",
        help="nested list operations (MIN, MAX, MED, SM) over 500-2000 tokens, 10 classes",
        description="ListOps: the value (0-9) of a nested expression such as [MAX 2 9 [MIN 4 7 ] 0 ].",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    actions = task.add_subparsers(dest="action", required=True, metavar="ACTION", help="prepare, train or evaluate")

    p = actions.add_parser(
        "prepare",
        help="generate basic_{train,val,test}.tsv",
        description="Generate the ListOps data as LRA does (operators MIN, MAX, MED, SM; depth <= 10; <= 10 "
        "arguments; 500 < length < 2000 tokens; no duplicates) into basic_train.tsv, basic_val.tsv and "
        "basic_test.tsv in LRA's layout. The same --seed and bounds give the same files, whatever --workers.",
    )
    p.add_argument("--out", metavar="DIR", default="data/listops", help="output directory (default: %(default)s)")
    p.add_argument("--num-train", type=count, default=96000, metavar="N", help="training examples (default: 96000)")
    p.add_argument("--num-val", type=count, default=2000, metavar="N", help="validation examples (default: 2000)")
    p.add_argument("--num-test", type=count, default=2000, metavar="N", help="test examples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    bounds = listops.Bounds()
    p.add_argument(
        "--min-length", type=int, default=bounds.min_length, metavar="N", help="keep length > N (default: 500)"
    )
    p.add_argument(
        "--max-length", type=int, default=bounds.max_length, metavar="N", help="keep length < N (default: 2000)"
    )
    p.add_argument("--max-depth", type=int, default=bounds.max_depth, metavar="N", help="tree depth (default: 10)")
    p.add_argument(
        "--max-args", type=int, default=bounds.max_args, metavar="N", help="arguments per operator (default: 10)"
    )
    p.add_argument(
        "--workers",
        type=count,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        metavar="N",
        help="processes sampling in parallel (default: the CPU cores, %(default)s)",
    )
    p.set_defaults(run=command_prepare)

    p = actions.add_parser(
        "train",
        help="train a classifier (LRA's configuration with the study's learning rate by default)",
        formatter_class=formatter,
        description="Train the ListOps classifier; every flag defaults to LRA's configuration except the study's peak lr 1.5e-4 and clipping at 1. Writes to --out: "
        "model.safetensors and config.json (at every validation and at the end), metrics.csv, curves.png "
        "(train and validation accuracy) and results.json (test accuracy of the final model, time, memory).",
        epilog=EXAMPLES,
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: runs/listops-ATTENTION)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (weights, optimizer, RNG, step) with its "
        "saved configuration; the other flags are ignored",
    )
    add_field_flags(p)
    p.set_defaults(run=command_train)

    p = actions.add_parser(
        "evaluate",
        help="accuracy of a checkpoint on a split",
        description="Print the accuracy of a checkpoint written by `lra listops train` on a split of its data.",
    )
    p.add_argument("--checkpoint", metavar="DIR", required=True, help="a directory written by lra listops train --out")
    p.add_argument("--split", choices=tuple(listops.SPLITS), default="test", help="which split (default: test)")
    p.add_argument("--data", metavar="DIR", help="directory of the .tsv files (default: the checkpoint's)")
    p.add_argument(
        "--batch-size", type=count, metavar="N", help="sequences per forward pass (default: the checkpoint's)"
    )
    p.add_argument("--device", default="auto", metavar="NAME", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 on GPUs that support it"
    )
    p.set_defaults(run=command_evaluate)
