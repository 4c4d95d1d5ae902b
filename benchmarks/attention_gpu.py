"""GPU benchmark: hierarchical attention (ours) vs dense SDPA vs the h-transformer-1d 0.1.9 package.

    PYTHONPATH=. python benchmarks/attention_gpu.py [--quick] [--legacy-site DIR]

Side by side in one run, on one card (bf16 autocast, batch 1):
  * one attention layer with its projections (dim 512, 8 heads x 64, block 128): forward+backward
    and forward-only median time, and peak memory (max_memory_allocated during the step minus what
    was allocated before it: weights and input), non-causal and causal, N = 1k .. 128k, forward-only
    up to 1M;
  * the attention core alone (h_attention on bf16 q, k, v): achieved TFLOP/s counting only the
    blocks the kernels compute (DESIGN.md section 1), from the kernels' own CUDA time (profiler)
    and end to end;
  * the seed README model (12 layers, dim 512, 8,000 tokens, shift_tokens) training tokens/s and
    peak memory, reversible and not, and ours (not reversible) through torch.compile, default mode
    and mode="reduce-overhead" (CUDA graphs).
The 0.1.9 package shares our import name, so it runs in a separate worker process whose PYTHONPATH
holds only its install (--legacy-site). Writes benchmarks/results/attention_gpu.{md,json,png}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from scaling import sdpa_kernels_or_error, sdpa_line

HERE = Path(__file__).resolve().parent
DIM, HEADS, DIM_HEAD, BLOCK = 512, 8, 64, 128
TRAIN_NS = [1024, 4096, 16384, 65536, 131072]
FWD_ONLY_NS = [262144, 1048576]


def timed(fn, reps: int) -> tuple[float, float]:
    """Median milliseconds of fn() over reps after a warm-up, and peak extra MiB during the runs."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def reps_for(n: int) -> int:
    return 10 if n <= 16384 else 5 if n <= 131072 else 2


def make_layer(impl: str, causal: bool, n: int):
    if impl == "legacy":
        from h_transformer_1d.h_transformer_1d import CausalHAttention1D, HAttention1D

        if causal:
            return CausalHAttention1D(DIM, max_seq_len=n, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK)
        return HAttention1D(DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK)
    from h_transformer_1d import CausalHAttention1D, HAttention1D

    cls = CausalHAttention1D if causal else HAttention1D
    return cls(DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK, attention="dense" if impl == "sdpa" else "hierarchical")


def bench_layer(impl: str, causal: bool, n: int, backward: bool) -> dict:
    torch.manual_seed(0)
    layer = make_layer(impl, causal, n).cuda()
    x = torch.randn(1, n, DIM, device="cuda", requires_grad=backward)
    grad = torch.randn(1, n, DIM, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        if backward:
            y.float().backward(grad)

    try:
        with torch.set_grad_enabled(backward):
            ms, mib = timed(step, reps_for(n))
        return {"ms": ms, "peak_mib": mib}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # the 0.1.9 package asserts on some shapes
        return {"error": f"{type(e).__name__}: {str(e)[:80]}"}
    finally:
        del layer, x, grad
        torch.cuda.empty_cache()


def computed_score_blocks(n: int, nr: int, causal: bool) -> int:
    """Number of (nr x nr) score tiles the kernels compute for one head (DESIGN.md section 1)."""
    from h_transformer_1d.attention import num_levels

    tiles = 0
    for level in range(num_levels(n, nr) + 1):
        nb = -(-n // (nr << level))
        offsets = ((-1, 0) if causal else (-1, 0, 1)) if level == 0 else ((-1,) if causal else (-1, 1))
        tiles += sum(1 for c in range(nb) for o in offsets if 0 <= c + o < nb)
    return tiles


def bench_core(causal: bool, n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from h_transformer_1d import h_attention

    q, k, v = (torch.randn(1, HEADS, n, DIM_HEAD, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    flops_fwd = 4 * DIM_HEAD * BLOCK * BLOCK * computed_score_blocks(n, BLOCK, causal) * HEADS
    fwd = lambda: h_attention(q, k, v, block_size=BLOCK, causal=causal)  # noqa: E731
    with torch.no_grad():
        fwd_ms, _ = timed(fwd, reps_for(n))
    both_ms, _ = timed(lambda: fwd().backward(grad), reps_for(n))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fwd().backward(grad)
        torch.cuda.synchronize()
    kernel_us = {"fwd": 0.0, "bwd": 0.0, "glue": 0.0}
    for event in prof.key_averages():
        if "window_fwd_kernel" in event.key:
            kernel_us["fwd"] += event.device_time_total / 3
        elif "window_bwd" in event.key:
            kernel_us["bwd"] += event.device_time_total / 3
        elif any(name in event.key for name in ("coarsen_kernel", "fold_kernel", "uncoarsen_kernel")):
            kernel_us["glue"] += event.device_time_total / 3
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": both_ms,
        "fwd_kernel_ms": kernel_us["fwd"] / 1e3,
        "bwd_kernel_ms": kernel_us["bwd"] / 1e3,
        "glue_kernel_ms": kernel_us["glue"] / 1e3,  # coarsen + fold + uncoarsen, forward and backward
        "fwd_tflops_kernel": flops_fwd / (kernel_us["fwd"] * 1e-6) / 1e12 if kernel_us["fwd"] else None,
        "bwd_tflops_kernel": 2.5 * flops_fwd / (kernel_us["bwd"] * 1e-6) / 1e12 if kernel_us["bwd"] else None,
        "fwd_tflops_end_to_end": flops_fwd / (fwd_ms * 1e-3) / 1e12,
        "fwd_bwd_tflops_end_to_end": 3.5 * flops_fwd / (both_ms * 1e-3) / 1e12,
    }


def bench_model(impl: str, reversible: bool, steps: int = 6, compile_mode: str | None = None) -> dict:
    """Training tokens/s and peak memory of the seed model; `compile_mode`: the model through
    torch.compile with that mode ("default", or "reduce-overhead": CUDA graphs), warmed up first."""
    torch.manual_seed(0)
    kw = dict(num_tokens=256, dim=512, depth=12, max_seq_len=8192, heads=8, dim_head=64, block_size=128,
              reversible=reversible, shift_tokens=True)
    if impl == "legacy":
        from h_transformer_1d import HTransformer1D

        model = HTransformer1D(**kw)
    else:
        from h_transformer_1d import HTransformer1D

        model = HTransformer1D(**kw)
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    run = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    x = torch.randint(0, 256, (1, 8000), device="cuda")
    target = torch.randint(0, 256, (1, 8000), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = run(x)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(1 if compile_mode is None else 4):  # compiling, then recording graphs
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms, _ = timed(step, steps)
        return {"tokens_per_s": 8000 / (ms / 1e3), "step_ms": ms, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as error:  # a compile mode that fails is reported in its row, the run goes on
        if compile_mode is None:
            raise
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    finally:
        del model, opt, run
        if compile_mode is not None:
            torch._dynamo.reset()  # drops the compiled graphs (and their CUDA graph memory pools)
        torch.cuda.empty_cache()


def worker(impl_set: str, quick: bool) -> dict:
    impls = ["legacy"] if impl_set == "legacy" else ["ours", "sdpa"]
    train_ns = TRAIN_NS[:2] if quick else TRAIN_NS
    fwd_ns = [] if quick else FWD_ONLY_NS
    out = {"layer": [], "core": [], "model": []}
    for impl in impls:
        for causal in (False, True):
            for n in train_ns + fwd_ns:
                row = {"impl": impl, "causal": causal, "n": n}
                if n in train_ns:
                    row["fwd_bwd"] = bench_layer(impl, causal, n, backward=True)
                row["fwd"] = bench_layer(impl, causal, n, backward=False)
                print(json.dumps(row), flush=True)
                out["layer"].append(row)
        if impl != "sdpa":
            for reversible in (False, True):
                row = {"impl": impl, "reversible": reversible, **bench_model(impl, reversible)}
                print(json.dumps(row), flush=True)
                out["model"].append(row)
            if impl == "ours" and not quick:
                for mode in ("default", "reduce-overhead"):
                    row = {"impl": f"ours, torch.compile {mode}", "reversible": False}
                    row.update(bench_model(impl, False, compile_mode=mode))
                    print(json.dumps(row), flush=True)
                    out["model"].append(row)
    if impl_set == "ours":
        for causal in (False, True):
            for n in ([4096, 16384] if quick else [4096, 16384, 65536, 131072]):
                row = {"causal": causal, "n": n, **bench_core(causal, n)}
                print(json.dumps(row), flush=True)
                out["core"].append(row)
    return out


def sdpa_probes() -> dict:
    """Which SDPA backend the dense layer runs: scaling.sdpa_kernels (the CUDA kernels of one bf16 forward
    and backward) at the layer's head shape, 16k tokens, non-causal and causal."""
    return {name: sdpa_kernels_or_error(1, HEADS, 16384, DIM_HEAD, causal=causal)
            for name, causal in (("non-causal", False), ("causal", True))}  # fmt: skip


def sdpa_lines(sdpa: dict | None) -> list[str]:
    """The report's lines about the probes, one per mask."""
    return [f"{kind.capitalize()}: {sdpa_line(probe)}" for kind, probe in (sdpa or {}).items()] or [sdpa_line(None)]


def fmt(cell: dict | None, key: str, digits: int = 2) -> str:
    if not cell:
        return "-"
    if "error" in cell:
        return cell["error"]
    return f"{cell[key]:.{digits}f}" if cell.get(key) is not None else "-"


def report(results: dict, env: dict, out_dir: Path) -> None:
    layer = {(r["impl"], r["causal"], r["n"]): r for part in results.values() for r in part["layer"]}
    lines = [
        "# GPU benchmark: hierarchical attention vs dense SDPA vs h-transformer-1d 0.1.9",
        "",
        f"Card: **{env['card']}**; torch {env['torch']}; triton {env['triton']}.",
        *sdpa_lines(env.get("sdpa")),
        "Command: `PYTHONPATH=. python benchmarks/attention_gpu.py --legacy-site <0.1.9 install>`.",
        "One attention layer with its projections (dim 512, 8 heads x 64, block 128), bf16 autocast, batch 1.",
        "Times are medians in ms; memory is the peak extra MiB during the step.",
        "",
    ]
    for causal in (False, True):
        lines += [f"## {'Causal' if causal else 'Non-causal'} layer", "",
                  "| N | ours fwd+bwd | SDPA fwd+bwd | 0.1.9 fwd+bwd | vs SDPA | vs 0.1.9 | ours fwd | SDPA fwd | 0.1.9 fwd | ours MiB | SDPA MiB | 0.1.9 MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in TRAIN_NS + FWD_ONLY_NS:
            cells = [layer.get((impl, causal, n), {}) for impl in ("ours", "sdpa", "legacy")]
            if not any(cells):
                continue
            fb = [c.get("fwd_bwd") for c in cells]
            fo = [c.get("fwd") for c in cells]

            def ratio(other, ours=fb[0]):
                if ours and other and "ms" in ours and "ms" in other:
                    return f"{other['ms'] / ours['ms']:.1f}x"
                return "-"

            mem = [fmt(c.get("fwd_bwd") or c.get("fwd"), "peak_mib", 0) for c in cells]
            lines.append(f"| {n:,} | " + " | ".join([fmt(x, "ms") for x in fb] + [ratio(fb[1]), ratio(fb[2])]
                                                     + [fmt(x, "ms") for x in fo] + mem) + " |")
        lines.append("")
    lines += ["(Rows past 128k are forward-only; their memory column is the forward's.)", "",
              "## Attention kernels (h_attention core, bf16, 8 heads x 64, block 128)", "",
              "TFLOP/s count only computed blocks: `4 * D * Nr^2` per computed score tile forward, 2.5x that backward.", "",
              "Window kernels = the attention itself; glue kernels = coarsening, folding and un-coarsening (forward and backward).", "",
              "| causal | N | fwd ms | fwd+bwd ms | fwd window kernels ms | bwd window kernels ms | glue kernels ms | fwd kernel TFLOP/s | bwd kernel TFLOP/s | fwd end-to-end TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["ours"]["core"]:
        lines.append(f"| {r['causal']} | {r['n']:,} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_kernel_ms']:.3f} | "
                     f"{r['bwd_kernel_ms']:.3f} | {r.get('glue_kernel_ms', 0):.3f} | {r['fwd_tflops_kernel'] or 0:.0f} | {r['bwd_tflops_kernel'] or 0:.0f} | "
                     f"{r['fwd_tflops_end_to_end']:.0f} |")
    lines += ["", "## Seed README model training (12 layers, dim 512, 8,000 tokens, shift_tokens, bf16 autocast, AdamW)", "",
              "| impl | reversible | tokens/s | step ms | peak MiB |", "|---|---|---|---|---|"]
    for part in results.values():
        for r in part["model"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['reversible']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['impl']} | {r['reversible']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['peak_mib']:,.0f} |")
    (out_dir / "attention_gpu.md").write_text("\n".join(lines) + "\n")
    (out_dir / "attention_gpu.json").write_text(json.dumps({"env": env, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, (key, title) in zip(axes, [("fwd_bwd", "forward+backward"), ("fwd", "forward only")]):
        for impl, color in (("ours", "tab:blue"), ("sdpa", "tab:orange"), ("legacy", "tab:green")):
            for causal, style in ((False, "-"), (True, "--")):
                pts = [(n, layer[(impl, causal, n)][key]["ms"]) for n in TRAIN_NS + FWD_ONLY_NS
                       if (impl, causal, n) in layer and "ms" in (layer[(impl, causal, n)].get(key) or {})]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color,
                            label=f"{'ours' if impl == 'ours' else 'SDPA' if impl == 'sdpa' else '0.1.9'} {'causal' if causal else 'non-causal'}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms", title=f"layer {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for impl, color in (("ours", "tab:blue"), ("sdpa", "tab:orange"), ("legacy", "tab:green")):
        for causal, style in ((False, "-"), (True, "--")):
            pts = [(n, layer[(impl, causal, n)]["fwd_bwd"]["peak_mib"]) for n in TRAIN_NS
                   if (impl, causal, n) in layer and "peak_mib" in (layer[(impl, causal, n)].get("fwd_bwd") or {})]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=color)
    ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="MiB", title="peak extra memory, fwd+bwd")
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{env['card']}, torch {env['torch']}, bf16, dim 512, 8x64 heads, block 128")
    fig.tight_layout()
    fig.savefig(out_dir / "attention_gpu.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "legacy"], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--legacy-site", type=Path, help="directory where h-transformer-1d==0.1.9 is installed")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.quick)), flush=True)
        return

    import triton

    env = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "sdpa": sdpa_probes()}
    results = {}
    runs = [("ours", str(HERE.parent))] + ([("legacy", str(args.legacy_site))] if args.legacy_site else [])
    for impl_set, path in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl_set] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-3000:])
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        print(proc.stdout[-4000:])
        results[impl_set] = json.loads(lines[-1][7:]) if lines else {"layer": [], "core": [], "model": []}
    results.setdefault("legacy", {"layer": [], "core": [], "model": []})
    args.out.mkdir(parents=True, exist_ok=True)
    report(results, env, args.out)
    print((args.out / "attention_gpu.md").read_text())


if __name__ == "__main__":
    main()
