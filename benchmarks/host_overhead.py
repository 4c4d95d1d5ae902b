"""Host (CPU) time of one fused hierarchical attention call, forward + backward, without the GPU work.

    PYTHONPATH=. python benchmarks/host_overhead.py [--device cpu|cuda] [--out-dir DIR]   # ~15 s on the CPU
    PYTHONPATH=. python benchmarks/host_overhead.py --quick --out-dir /tmp/ho              # smoke run

Replaces every Triton kernel launch by a no-op and times what is left of `fused_h_attention` plus its
backward: argument handling, the custom ops' or the autograd.Function's dispatch, the allocations and
the launch logic. That is the time the CPU spends per layer call before the GPU can start, which bounds
short sequences (the GPU finishes their kernels sooner than the CPU issues them). Two paths, measured in
alternation in one process: through the `torch.library` custom ops (what torch.compile traces) and
through the eager autograd.Function (what eager calls take). Triton's own launch cost is not included
(the launches are stubbed). On the CPU the allocations are real allocations; with `--device cuda` they
come from PyTorch's caching allocator, as in training.

Writes host_overhead.{md,json,png} to --out-dir (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
from scaling import cpu_model, gpu_names

from h_transformer_1d.attention import fused
from h_transformer_1d.attention import triton_kernels as tk

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CASES = [(1024, 128), (4096, 256), (4096, 512), (16384, 512)]  # (N, block size); B 8 (N 16,384: 2), H 8, D 64
QUICK_CASES = [(256, 32), (512, 64)]
PATHS = {"custom ops": True, "autograd.Function": False}


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](*args)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    for name in dir(tk):
        if name.endswith("_kernel"):
            setattr(tk, name, _NoLaunch())


def time_call(fn, calls: int, repeats: int) -> float:
    """Best of `repeats` means over `calls` calls, in microseconds."""
    for _ in range(max(calls // 10, 3)):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def measure(n: int, block: int, device: torch.device, calls: int, repeats: int) -> dict:
    b, h, d = (8 if n <= 4096 else 2), 8, 64
    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_()
    grad = torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16)
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, device=device).float() / d))

    def forward():
        return fused.fused_h_attention(q, k, v, block_size=block, causal=True, rotary_freqs=freqs)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        forward().backward(grad)

    row = {"n": n, "block": block, "batch": b}
    for rnd in range(2):  # alternate the paths twice; keep each path's best
        for name, via_ops in PATHS.items():
            fused._VIA_CUSTOM_OPS = via_ops
            fwd, both = time_call(forward, calls, repeats), time_call(forward_backward, calls, repeats)
            key = f"{name}|"
            row[key + "fwd_us"] = min(fwd, row.get(key + "fwd_us", fwd))
            row[key + "fwd_bwd_us"] = min(both, row.get(key + "fwd_bwd_us", both))
    fused._VIA_CUSTOM_OPS = False
    return row


def write(rows: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "host_overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    machine = meta["cpu"] + (f" with {meta['gpu']}" if meta["gpu"] else "")
    lines = [
        "# Host time of one fused attention call (kernel launches stubbed)",
        "",
        f"Machine: {machine} ({meta['device']} tensors); torch {meta['torch']}; {meta['date']}.",
        f"Command: `{meta['command']}`.",
        (
            "bf16, causal, rotary, H 8, D 64; microseconds per call, best of "
            f"{meta['repeats']} x {meta['calls']} calls, each path measured twice in alternation."
        ),
        "",
        (
            "| N | block | batch | custom ops fwd | custom ops fwd+bwd | autograd.Function fwd | "
            "autograd.Function fwd+bwd | saved per fwd+bwd |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ops, fn = r["custom ops|fwd_bwd_us"], r["autograd.Function|fwd_bwd_us"]
        lines.append(
            f"| {r['n']:,} | {r['block']} | {r['batch']} | {r['custom ops|fwd_us']:.0f} | {ops:.0f} | "
            f"{r['autograd.Function|fwd_us']:.0f} | {fn:.0f} | {ops - fn:.0f} ({(ops - fn) / ops:.0%}) |"
        )
    (out_dir / "host_overhead.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"N {r['n']:,}\nblock {r['block']}" for r in rows]
    x = range(len(rows))
    for i, name in enumerate(PATHS):
        ax.bar([j + (i - 0.5) * 0.4 for j in x], [r[f"{name}|fwd_bwd_us"] for r in rows], 0.4, label=name)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("host µs per forward + backward")
    ax.set_title(f"Host time per fused attention call ({meta['device']}, launches stubbed)")
    ax.set_ylim(0, 1.3 * max(r[f"{name}|fwd_bwd_us"] for r in rows for name in PATHS))
    ax.legend(loc="upper left", ncols=2)
    fig.tight_layout()
    fig.savefig(out_dir / "host_overhead.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--calls", type=int, default=100, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per path; the best counts")
    parser.add_argument("--out-dir", type=os.path.abspath, default=str(RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help="two small shapes, few calls (smoke run)")
    args = parser.parse_args()
    for flag in ("calls", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be an integer >= 1, got {getattr(args, flag)}")
    if args.quick:
        args.calls, args.repeats = min(args.calls, 5), min(args.repeats, 2)
    device = torch.device(args.device)
    stub_kernels()
    rows = []
    for n, block in QUICK_CASES if args.quick else CASES:
        rows.append(measure(n, block, device, args.calls, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    meta = {
        "cpu": cpu_model(),
        "gpu": ", ".join(gpu_names()) if device.type == "cuda" else None,
        "device": device.type,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=. python benchmarks/host_overhead.py"
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (" --quick" if args.quick else ""),
        "calls": args.calls,
        "repeats": args.repeats,
    }
    write(rows, meta, Path(args.out_dir))
    print(f"wrote {Path(args.out_dir) / 'host_overhead.md'}")


if __name__ == "__main__":
    main()
