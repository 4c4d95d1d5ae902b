"""Training speed of the whole model, hierarchical attention (at several block sizes) against dense
attention (SDPA), eager and torch.compile'd, at several contexts with the same tokens per step, and
where each step's GPU time goes.

    PYTHONPATH=. python benchmarks/train_speed.py                       # GPU: contexts 4,096 and 16,384
    PYTHONPATH=. python benchmarks/train_speed.py --device cpu --quick  # smoke run, a CPU minute

Every configuration runs in a process of its own (this script with --child): the model of --preset
with that context and block size, --steps timed AdamW steps on random bytes after 2 untimed ones (bf16
autocast on a GPU; `h_transformer_1d.apps.bench`, the CLI's `bench`), then on a GPU --profile-steps
more under torch.profiler, whose kernels are split into attention (ours: the window, coarsen, fold
and uncoarsen kernels; dense: SDPA's) and everything else. Dense attention rotates q and k with
PyTorch element-wise ops (counted as "other"); ours rotates inside the coarsen kernel. The "path" column
says which attention code ran: SDPA, our Triton kernels, or our blocked PyTorch path (where the kernels
do not take the device, head size or block size).

Writes --out-dir/train_speed.{md,json,png} after every configuration, so a run stopped early leaves
a report of what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from scaling import (
    RESULTS_DIR,
    SDPA_KERNEL_MARKS,
    child_env,
    environment,
    fmt,
    pyplot,
    save_figure,
    script_command,
    write_json,
    write_text,
)

from h_transformer_1d.apps.bench import UNTIMED_STEPS

TARGET_SPEEDUP = 1.5  # the training tool issue: 1.5x dense's tokens/s (at context 4,096)
OUR_KERNELS = ("window_", "coarsen_kernel", "fold_kernel", "uncoarsen_kernel")
QUICK_MODEL = {"dim": 64, "depth": 2, "heads": 2, "dim_head": 32}


def is_attention_kernel(name: str) -> bool:
    lower = name.lower()
    return any(k in lower for k in OUR_KERNELS + SDPA_KERNEL_MARKS)


def split_kernel_time(events, steps: int) -> dict:
    """Device milliseconds per step of attention kernels and of the rest, from profiler kernel events
    given as (name, microseconds); the attention kernels' names."""
    attention = other = 0.0
    names = set()
    for name, us in events:
        if is_attention_kernel(name):
            attention += us
            names.add(name)
        else:
            other += us
    return {
        "attention_ms": attention / steps / 1e3,
        "other_ms": other / steps / 1e3,
        "attention_kernels": sorted(names),
    }


# ----------------------------------------------------------------------------------------------------
# one configuration (the child process)
# ----------------------------------------------------------------------------------------------------


def child(args) -> dict:
    import torch

    from h_transformer_1d.apps.bench import bench_one, training_step
    from h_transformer_1d.apps.config import resolve, validate
    from h_transformer_1d.apps.train import Runtime, resolve_device

    flags = {"preset": args.preset, "seq_len": args.context, "batch_size": args.tokens_per_step // args.context,
             "block_size": args.block, "attention": args.attention, "compile": args.mode == "compiled"}  # fmt: skip
    cfg, _ = resolve({**flags, **json.loads(args.model_flags or "{}")})
    validate(cfg)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the Triton kernels launch on the current device
    rt = Runtime(device=device, bf16=device.type == "cuda")
    start = time.perf_counter()
    step = training_step(cfg, rt)
    ms, tokens_per_s, mib = bench_one(cfg, args.steps, rt, step)
    row = {"ms_per_step": ms, "tokens_per_s": tokens_per_s, "peak_mib": mib,
           "params": sum(p.numel() for p in step.model.parameters()),
           "batch_size": cfg.batch_size, "setup_and_run_s": time.perf_counter() - start,
           "path": attention_path(cfg, device)}  # fmt: skip
    if device.type == "cuda" and args.profile_steps:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.profile_steps):
                step()
            torch.cuda.synchronize()
        kernels = [  # device work only: not the GPU spans of record_function ranges (user annotations)
            (e.name, e.time_range.elapsed_us())
            for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        row.update(split_kernel_time(kernels, args.profile_steps))
        row["kernels_per_step"] = len(kernels) / args.profile_steps
    return row


def attention_path(cfg, device) -> str:
    """Which attention code runs in training: SDPA, our Triton kernels, or our blocked PyTorch path (where
    h_attention's own dispatch turns the kernels down: device, head size, block size, dropout)."""
    import torch

    from h_transformer_1d.attention.interface import _use_triton

    if cfg.attention == "dense":
        return "SDPA"
    q = torch.empty(1, 1, 1, cfg.dim_head, dtype=torch.bfloat16, device=device)  # bf16 autocast on a GPU
    return "kernels" if _use_triton(q, cfg.block_size, cfg.dropout, "auto") else "blocked PyTorch"


# ----------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------


def configurations(args) -> list[dict]:
    out = []
    for context in args.contexts:
        for mode in args.modes:
            out.append({"context": context, "mode": mode, "attention": "dense", "block": None})
            for block in args.blocks:
                out.append({"context": context, "mode": mode, "attention": "hierarchical", "block": block})
    return out


def run_configuration(args, conf: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--device", args.device,
               "--preset", args.preset, "--context", str(conf["context"]), "--mode", conf["mode"],
               "--attention", conf["attention"], "--block", str(conf["block"] or args.blocks[0]),
               "--tokens-per-step", str(args.tokens_per_step), "--steps", str(args.steps),
               "--profile-steps", str(args.profile_steps)]  # fmt: skip
    if args.quick:
        command += ["--model-flags", json.dumps(QUICK_MODEL)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, check=False, env=child_env(), capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {**conf, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**conf, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return {**conf, **json.loads(lines[-1]), "wall_s": time.perf_counter() - start}


def speedups(rows: list[dict]) -> None:
    dense = {(r["context"], r["mode"]): r for r in rows if r["attention"] == "dense" and "error" not in r}
    for r in rows:
        base = dense.get((r["context"], r["mode"]))
        if r["attention"] == "hierarchical" and "error" not in r and base:
            r["vs_dense"] = r["tokens_per_s"] / base["tokens_per_s"]


def label(r: dict) -> str:
    return "dense (SDPA)" if r["attention"] == "dense" else f"hierarchical, block {r['block']}"


def report(rows: list[dict], env: dict, args, out_dir) -> None:
    speedups(rows)
    params = [r["params"] for r in rows if r.get("params")]
    lines = [
        "# Training speed: hierarchical vs dense attention in the whole model",
        "",
        f"Card: **{env['card']}**; torch {env['torch']}; triton {env['triton']}; git {env['git']}; {env['date']}.",
        f"Command: `{script_command()}`"
        + (f" (H_TRANSFORMER_1D_AUTOTUNE={env['autotune']})" if env.get("autotune") is not None else "")
        + ".",
        f"Model: preset `{args.preset}`{f' (quick: {QUICK_MODEL})' if args.quick else ''}"
        + (f" ({params[0] / 1e6:.2f}M parameters)" if params else "")
        + ", "
        f"{args.tokens_per_step:,} tokens per step (batch = tokens / context), AdamW, "
        f"{'bf16 autocast' if args.device != 'cpu' else 'float32'}, random bytes; "
        f"{args.steps} timed steps after {UNTIMED_STEPS}."
        + (
            f" Attention and other kernel times: device ms per step over {args.profile_steps} profiled steps."
            if args.device != "cpu" and args.profile_steps
            else ""
        ),
        f"SDPA kernels seen in the dense runs: {env.get('sdpa') or '-'}.",
        "",
        (
            "| context | mode | attention | path | tokens/s | vs dense | ms/step | attention kernels ms/step"
            " | other kernels ms/step | kernels/step | peak MiB |"
        ),
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            error = r["error"].replace("|", "/")
            lines.append(f"| {r['context']:,} | {r['mode']} | {label(r)} | | {error} | | | | | | |")
            continue
        lines.append(
            f"| {r['context']:,} | {r['mode']} | {label(r)} | {r.get('path', '-')} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(r.get('vs_dense'), '.2f')}{'x' if r.get('vs_dense') else ''} | {fmt(r['ms_per_step'], '.1f')} | "
            f"{fmt(r.get('attention_ms'), '.1f')} | {fmt(r.get('other_ms'), '.1f')} | "
            f"{fmt(r.get('kernels_per_step'))} | {fmt(r['peak_mib'])} |"
        )
    best = [r for r in rows if r.get("vs_dense")]
    if best:
        top = max(best, key=lambda r: r["vs_dense"])
        lines += [
            "",
            (
                f"Fastest against dense: {label(top)} at context {top['context']:,} ({top['mode']}), "
                f"{top['vs_dense']:.2f}x (the training tool issue asks {TARGET_SPEEDUP}x at context 4,096)."
            ),
        ]
    write_text(out_dir / "train_speed.md", "\n".join(lines) + "\n")
    write_json(out_dir / "train_speed.json", {"environment": env, "rows": rows, "command": script_command()})
    plot(rows, out_dir)


def plot(rows: list[dict], out_dir) -> None:
    plt = pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        mine = [r for r in rows if r["mode"] == mode and r.get("vs_dense")]
        contexts = list(dict.fromkeys(r["context"] for r in rows if r["mode"] == mode))
        blocks = list(dict.fromkeys(r["block"] for r in mine))
        width = 0.8 / max(len(blocks), 1)
        for j, block in enumerate(blocks):
            xs, ys = [], []
            for i, context in enumerate(contexts):
                hit = [r for r in mine if r["context"] == context and r["block"] == block]
                if hit:
                    xs.append(i + (j - (len(blocks) - 1) / 2) * width)
                    ys.append(hit[0]["vs_dense"])
            ax.bar(xs, ys, width, label=f"hierarchical, block {block}")
        ax.axhline(1.0, color="black", lw=1, label="dense (SDPA)")
        ax.axhline(TARGET_SPEEDUP, color="red", ls="--", lw=1, label=f"{TARGET_SPEEDUP}x")
        ax.set_xticks(range(len(contexts)), [f"{c:,}" for c in contexts])
        ax.set_xlabel("context (tokens per step fixed)")
        ax.set_title(f"{mode}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("training tokens/s vs dense")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Whole-model training speed against dense attention")
    fig.tight_layout()
    save_figure(fig, out_dir / "train_speed.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a tiny model, contexts 128 and 256, blocks 16 and 32, eager, 2 steps of 512 tokens "
        "(overrides --contexts, --blocks, --modes, --steps, --tokens-per-step)",
    )
    parser.add_argument("--preset", default="base")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (GPU; 0: none)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    parser.add_argument("--out-dir", type=os.path.abspath, default=str(RESULTS_DIR))
    # one configuration (internal)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--attention", help=argparse.SUPPRESS)
    parser.add_argument("--block", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-flags", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    if args.quick:
        args.contexts, args.blocks, args.modes = [128, 256], [16, 32], ["eager"]
        args.tokens_per_step, args.steps = 512, 2
    for name, value, least in (("--steps", args.steps, 1), ("--profile-steps", args.profile_steps, 0),
                               ("--tokens-per-step", args.tokens_per_step, 1)):  # fmt: skip
        if value < least:
            parser.error(f"{name} must be an integer >= {least}, got {value}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    for context in args.contexts:
        if context <= 0 or args.tokens_per_step % context:
            parser.error(f"--contexts: each must divide --tokens-per-step {args.tokens_per_step}, got {context}")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (try --device cpu --quick)")
    from pathlib import Path

    out_dir = Path(args.out_dir)
    env = {**environment(args.device), "autotune": os.environ.get("H_TRANSFORMER_1D_AUTOTUNE")}
    rows = []
    from tqdm import tqdm

    for conf in tqdm(configurations(args), desc="configurations"):
        row = run_configuration(args, conf)
        rows.append(row)
        tqdm.write(json.dumps({k: v for k, v in row.items() if k != "attention_kernels"}))
        if row["attention"] == "dense" and row.get("attention_kernels"):
            env["sdpa"] = ", ".join(row["attention_kernels"])
        report(rows, env, args, out_dir)  # after every configuration: a stopped run leaves its report
    print(f"wrote {out_dir / 'train_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
