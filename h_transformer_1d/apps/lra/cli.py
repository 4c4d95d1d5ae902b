"""`h-transformer-1d lra listops prepare | train | evaluate`."""

import argparse
import dataclasses
import os
import time
from functools import partial
from pathlib import Path

from ..core import checkpoint
from ..core.cli import add_evaluate_flags, add_train_flags, open_run, positive_int
from ..core.config import ConfigError, overrides
from ..core.runtime import start_runtime
from ..core.training import format_duration
from . import listops
from .config import LISTOPS, PRETRAIN, ListOpsConfig, PretrainConfig, Recipe
from .train import accuracy, load_split, train

EXAMPLES = """examples:
  h-transformer-1d lra listops prepare --out data/listops        # 96,000 / 2,000 / 2,000 examples, minutes
  h-transformer-1d lra listops train --data data/listops         # LRA's configuration, hierarchical attention (GPU)
  h-transformer-1d lra listops train --data data/listops --attention dense
  h-transformer-1d lra listops evaluate --checkpoint runs/listops-hierarchical
  h-transformer-1d lra listops pretrain --data data/listops --out runs/pre   # Recipe B: masked tokens, then
  h-transformer-1d lra listops train --data data/listops --init-from runs/pre --pool mean
"""


def command_prepare(args) -> None:
    out = Path(args.out)
    counts = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    bounds = listops.Bounds(args.max_depth, args.max_args, args.min_length, args.max_length)
    start = time.perf_counter()
    listops.write_splits(out, counts, args.seed, bounds, workers=args.workers, progress=True)
    files = ", ".join(f"{listops.SPLITS[split]} ({count:,})" for split, count in counts.items())
    print(f"wrote {files} to {out} in {format_duration(time.perf_counter() - start)}")


def resolve(flags: dict, stored: Recipe | None, cls: type = ListOpsConfig) -> tuple[Recipe, str]:
    """The run's configuration (the recipe's defaults, or the checkpoint's, under a TOML file and the flags) and
    its default --out."""
    values, _ = overrides(cls, flags)
    budgets = [name for name in ("steps", "epochs") if name in flags]
    if len(budgets) == 2 or (not budgets and {"steps", "epochs"} <= values.keys()):
        where = "" if budgets else f" (both in --config {flags['config']})"
        raise ConfigError(f"--steps and --epochs are exclusive: give the budget in one of them{where}")
    if budgets:  # a flag's budget replaces the TOML file's or the checkpoint's
        values.pop("epochs" if budgets == ["steps"] else "steps", None)
    if "steps" in values:
        values["epochs"] = 0.0
    if values.get("init_from"):  # as --data: found again from another working directory
        values["init_from"] = str(Path(values["init_from"]).resolve())
    cfg = dataclasses.replace(stored if stored is not None else cls(), **values)
    return cfg, f"runs/listops-{'pretrain-' if cls is PretrainConfig else ''}{cfg.attention}"


def command_train(args) -> None:
    cfg, out, ckpt = open_run(LISTOPS, args, resolve)
    train(cfg, out, ckpt)


def command_pretrain(args) -> None:
    cfg, out, ckpt = open_run(PRETRAIN, args, partial(resolve, cls=PretrainConfig))
    train(cfg, out, ckpt)


def command_evaluate(args) -> None:
    directory = Path(args.checkpoint)
    ckpt = checkpoint.load(directory, LISTOPS)
    cfg = ckpt.config
    rt = start_runtime(getattr(args, "device", "auto"), getattr(args, "precision", "auto"))
    data_dir = Path(getattr(args, "data", cfg.data))
    split = load_split(data_dir, args.split, getattr(args, "max_data_bytes", cfg.max_data_bytes)).to(rt.device)
    model = LISTOPS.model_of(ckpt, rt.device)
    result = accuracy(model, split, cfg, rt, args.batch_size or cfg.batch_size, progress=True)
    print(f"{args.split} accuracy: {result:.4f}")
    print(
        f"({len(split):,} examples of {data_dir}; checkpoint {directory} at step {ckpt.step}, "
        f"{cfg.attention} attention)"
    )


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
    actions = task.add_subparsers(dest="action", required=True, metavar="ACTION",
                                  help="prepare, train, pretrain or evaluate")  # fmt: skip

    p = actions.add_parser(
        "prepare",
        help="generate basic_{train,val,test}.tsv",
        description="Generate the ListOps data as LRA does (operators MIN, MAX, MED, SM; depth <= 10; <= 10 "
        "arguments; 500 < length < 2000 tokens; no duplicates) into basic_train.tsv, basic_val.tsv and "
        "basic_test.tsv in LRA's layout. The same --seed and bounds give the same files, whatever --workers.",
    )
    p.add_argument("--out", metavar="DIR", default="data/listops", help="output directory (default: %(default)s)")
    for split, count, what in (("train", 96000, "training"), ("val", 2000, "validation"), ("test", 2000, "test")):
        p.add_argument(f"--num-{split}", type=positive_int, default=count, metavar="N",
                       help=f"{what} examples (default: {count})")  # fmt: skip
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
        type=positive_int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        metavar="N",
        help="processes sampling in parallel (default: the CPU cores, %(default)s)",
    )
    p.set_defaults(run=command_prepare)

    trainers = {
        "train": (
            "train a classifier (LRA's configuration with the study's learning rate by default)",
            (
                "Train the ListOps classifier; every flag defaults to LRA's configuration except the study's peak lr "
                "1.5e-4 and clipping at 1. Writes to --out: checkpoints/step-N/ (model.safetensors, config.json, "
                "train_state.*, manifest.json: at every validation and at the end, the last 2 kept), best/ (the save "
                "of the best validation), metrics.csv, curves.png (train and validation accuracy) and results.json "
                "(test accuracy of the final model and of the best validation's, time, memory). Ctrl-C stops; "
                "--resume continues from the last checkpoint exactly."
            ),
            LISTOPS,
            "runs/listops-ATTENTION",
            command_train,
        ),
        "pretrain": (
            "masked-token pretraining on the training inputs (Recipe B), for train --init-from",
            (
                "Pretrain the classifier's body (the same flags, bidirectional) to predict masked tokens of the "
                "training inputs (--mask-rate of each input's tokens, never <cls> or padding; the loss on the masked "
                "positions only); validation: the share of masked tokens predicted. Writes checkpoints/step-N/, "
                "metrics.csv, curves.png and results.json to --out like train; `train --init-from OUT` starts a "
                "classifier's body from its last save."
            ),
            PRETRAIN,
            "runs/listops-pretrain-ATTENTION",
            command_pretrain,
        ),
    }
    for name, (help, description, app, default_out, run) in trainers.items():
        p = actions.add_parser(name, help=help, description=description, epilog=EXAMPLES, formatter_class=formatter)
        add_train_flags(p, app, default_out)
        p.set_defaults(run=run, resumable=True)

    p = actions.add_parser(
        "evaluate",
        help="accuracy of a checkpoint on a split",
        description="Print the accuracy of a checkpoint written by `lra listops train` on a split of its data.",
    )
    add_evaluate_flags(p, LISTOPS, tuple(listops.SPLITS), "sequences per forward pass (default: the checkpoint's)")
    p.set_defaults(run=command_evaluate)
