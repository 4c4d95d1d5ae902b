"""How the CPU cost of h_attention grows with N, measured in pairs so that a noisy machine cancels out.

    python benchmarks/length_ratios.py            # about 2 minutes on 2 cores
    python benchmarks/length_ratios.py --quick    # smoke run

The exact-attention issue's targets are ratios of two lengths' forward+backward times of the attention
core (B 1, H 8, D 64, float32, block 128): time(4097) / time(4096) <= 1.2 (any N costs about what its
neighbours cost: no padding to a power of two) and time(32768) / time(8192) <= 4.5 (linear growth).
`attention_cpu.py` times every N in its own process minutes apart; on this 2-core VM single entries move
by 15-40% between identical runs, so a ratio of two of them cannot decide a 10% target. Here both
lengths of a pair live in one worker process (glibc malloc tuned as in attention_cpu.py) and alternate,
A B B A A B ..., for --rounds rounds after a warm-up of each: drift and other processes' load hit both
sides alike. Reported per pair: the ratio of the two medians, the ratio of the two minimums (the least
disturbed runs) and the median of the per-round ratios (each round's B over its A), with the share of
the machine other processes used. Dense SDPA's ratio at 4097 / 4096 is measured the same way, for context.

Writes benchmarks/results/length_ratios.{md,json,png} (--quick: benchmarks/results/quick/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from attention_cpu import TUNED_MALLOC, RunTimer, collect_env, git_revision, machine_busy_cores
from scaling import REPO_ROOT, RESULTS_DIR, pyplot, save_figure, write_json, write_text
from tqdm import tqdm

HEADS, DIM_HEAD, BLOCK = 8, 64, 128
# (implementation, shorter N, longer N, target for time(longer) / time(shorter) or None)
PAIRS = [("ours", 4096, 4097, 1.2), ("ours", 8192, 32768, 4.5), ("sdpa", 4096, 4097, None)]
QUICK_PAIRS = [("ours", 256, 257, 1.2), ("ours", 256, 1024, 4.5), ("sdpa", 256, 257, None)]
RESULT_TAG = "LENGTH_RATIO_JSON:"


def measure_pair(impl: str, n_a: int, n_b: int, causal: bool, rounds: int) -> dict:
    """Worker side: alternate forward+backward at n_a and n_b; every run's wall time and disturbance."""
    import torch
    import torch.nn.functional as F

    from h_transformer_1d import h_attention

    gen = torch.Generator().manual_seed(0)
    steps = {}
    for n in (n_a, n_b):
        q, k, v = (torch.randn(1, HEADS, n, DIM_HEAD, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(1, HEADS, n, DIM_HEAD, generator=gen)
        if impl == "ours":
            fn = lambda q=q, k=k, v=v, g=grad: h_attention(q, k, v, block_size=BLOCK, causal=causal).backward(g)
        else:
            fn = lambda q=q, k=k, v=v, g=grad: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)

        def step(fn=fn, ts=(q, k, v)):
            for t in ts:
                t.grad = None
            fn()

        steps[n] = step
    for n in (n_a, n_b):  # warm-up
        steps[n]()
    times = {n_a: [], n_b: []}
    disturbed = {n_a: [], n_b: []}
    for r in range(rounds):
        for n in (n_a, n_b) if r % 2 == 0 else (n_b, n_a):
            with RunTimer() as t:
                steps[n]()
            times[n].append(t.wall)
            disturbed[n].append(t.other_share)
    return {"impl": impl, "n_a": n_a, "n_b": n_b, "causal": causal, "times_a": times[n_a], "times_b": times[n_b],
            "other_share_a": disturbed[n_a], "other_share_b": disturbed[n_b]}  # fmt: skip


def summarize(m: dict, target: float | None) -> dict:
    a, b = m["times_a"], m["times_b"]
    per_round = [tb / ta for ta, tb in zip(a, b)]
    shares = [s for s in m["other_share_a"] + m["other_share_b"] if s is not None]
    out = {
        "ratio_of_medians": statistics.median(b) / statistics.median(a),
        "ratio_of_minimums": min(b) / min(a),
        "median_round_ratio": statistics.median(per_round),
        "per_round_ratios": per_round,
        "median_ms_a": 1e3 * statistics.median(a),
        "median_ms_b": 1e3 * statistics.median(b),
        "max_other_share": max(shares) if shares else None,
        "target": target,
    }
    if target is not None:
        out["meets_target"] = max(out["ratio_of_minimums"], out["median_round_ratio"]) <= target
    return {**m, **out}


def run_worker(jobs: list[tuple], rounds: int, threads: int | None) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"jobs": jobs, "rounds": rounds,
           "threads": threads})]  # fmt: skip
    env = {**__import__("os").environ, **TUNED_MALLOC}
    env["PYTHONPATH"] = str(REPO_ROOT)
    results = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True, cwd=str(Path(__file__).parent)) as proc:
        bar = tqdm(total=len(jobs), unit="pair", desc="length pairs")
        for line in proc.stdout:
            if line.startswith(RESULT_TAG):
                results.append(json.loads(line[len(RESULT_TAG) :]))
                bar.update()
        bar.close()
    if proc.returncode != 0 or len(results) != len(jobs):
        raise SystemExit(f"worker failed (exit {proc.returncode}, {len(results)} of {len(jobs)} pairs)")
    return results


def worker_main(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    for impl, n_a, n_b, causal in spec["jobs"]:
        print(RESULT_TAG + json.dumps(measure_pair(impl, n_a, n_b, causal, spec["rounds"])), flush=True)


def write_report(data: dict, out_dir: Path) -> None:
    env = data["env"]
    lines = [
        "# Cost against length, measured in alternating pairs (CPU)",
        "",
        f"Generated by `{data['command']}` on {env['date']}; see the script's docstring for the method.",
        "",
        (f"- torch {env['torch']}, Python {env['python']}, {env['cpu_model']} ({env['logical_cpus']} logical CPUs, "
        f"torch threads {env['torch_threads']}); git {env['git_revision']}"),
        (f"- attention core forward+backward on (1, {HEADS}, N, {DIM_HEAD}) float32; ours = `h_attention(..., "
        f"block_size={BLOCK})`, SDPA = `F.scaled_dot_product_attention` (dense); {data['rounds']} alternating rounds "
        "after a warm-up of each length, all in one worker process"),
        f"- machine busy (other processes) before the run: {data['busy_cores_before']:.2f} cores",
        "",
        ("| impl | pair | causal | median ms (shorter) | median ms (longer) | ratio of medians | ratio of minimums "
        "| median of round ratios | target | max other share |"),
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in data["results"]:
        target = "(context)" if r["target"] is None else f"<= {r['target']} {'✅' if r['meets_target'] else '❌'}"
        share = "" if r["max_other_share"] is None else f"{100 * r['max_other_share']:.0f}%"
        lines.append(
            f"| {'ours' if r['impl'] == 'ours' else 'SDPA'} | {r['n_b']:,} / {r['n_a']:,} | {'yes' if r['causal'] else 'no'} "
            f"| {r['median_ms_a']:,.1f} | {r['median_ms_b']:,.1f} | {r['ratio_of_medians']:.3f} | "
            f"{r['ratio_of_minimums']:.3f} | {r['median_round_ratio']:.3f} | {target} | {share} |"
        )
    lines += [
        "",
        "A target counts as met when both the ratio of minimums and the median of the round ratios are within it.",
        "`max other share`: the largest share of all CPUs that other processes used during one timed run.",
        "",
        "![per-round ratios](length_ratios.png)",
        "",
    ]
    write_text(out_dir / "length_ratios.md", "\n".join(lines))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = []
    for i, r in enumerate(data["results"]):
        label = f"{r['impl']} {r['n_b']}/{r['n_a']}{' causal' if r['causal'] else ''}"
        ax.plot([i] * len(r["per_round_ratios"]), r["per_round_ratios"], "o", alpha=0.5)
        ax.plot([i - 0.3, i + 0.3], [r["median_round_ratio"]] * 2, "k-")
        if r["target"] is not None:
            ax.plot([i - 0.4, i + 0.4], [r["target"]] * 2, "r--")
        labels.append(label)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="time(longer) / time(shorter), per round", title="paired length ratios (black: median, red: target)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out_dir / "length_ratios.png")
    write_json(out_dir / "length_ratios.json", data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small lengths, 3 rounds (a smoke run)")
    p.add_argument("--rounds", type=int, help="alternating rounds per pair (default 15; --quick 3)")
    p.add_argument("--threads", type=int, help="torch threads in the worker (default: torch's)")
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results (--quick: benchmarks/results/quick)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be a positive integer, got {args.rounds}")
    rounds = args.rounds or (3 if args.quick else 15)
    out_dir = args.out_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = QUICK_PAIRS if args.quick else PAIRS
    jobs = [(impl, a, b, causal) for impl, a, b, _ in pairs for causal in (False, True)]
    busy = machine_busy_cores() or 0.0
    start = time.time()
    measured = run_worker(jobs, rounds, args.threads)
    targets = {(impl, a, b): t for impl, a, b, t in pairs}
    results = [summarize(m, targets[(m["impl"], m["n_a"], m["n_b"])]) for m in measured]
    env = collect_env(args.threads)
    env["git_revision"] = git_revision()
    command = "python benchmarks/length_ratios.py" + "".join(
        f" {flag} {value}" for flag, value in (("--rounds", args.rounds), ("--threads", args.threads),
                                                ("--out-dir", args.out_dir)) if value is not None
    ) + (" --quick" if args.quick else "")  # fmt: skip
    data = {"command": command, "env": env, "rounds": rounds, "busy_cores_before": busy,
            "wall_s": round(time.time() - start, 1), "results": results}  # fmt: skip
    write_report(data, out_dir)
    for r in results:
        print(f"{r['impl']:>4} {r['n_b']:>6}/{r['n_a']:<6} causal={r['causal']!s:<5} medians {r['ratio_of_medians']:.3f}, "
              f"minimums {r['ratio_of_minimums']:.3f}, round ratios {r['median_round_ratio']:.3f}")  # fmt: skip
    print(f"wrote {out_dir / 'length_ratios.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
