"""What can be measured: every study as data (name, what it measures, its cases, its baselines, its table and plot)
plus one `measure(case, opts)` that returns the measured values of one case. run.py does the rest.

Baselines: `ours` (this package), `SDPA` (the same layer or model with `attention="dense"`: exact attention through
torch's scaled_dot_product_attention) and `0.1.9` (the h-transformer-1d 0.1.9 package from PyPI, which has our import
name, so its cases run in a worker process that sees only that install). Nothing here imports torch or the package at
import time: run.py reads the registry before it picks the device, and 0.1.9 workers import the registry too.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    child_env,
    import_package,
    peak_mib,
    read_metrics,
    reset_peak,
    run_config,
    run_logged,
    steady_throughput,
    sync,
    time_fn,
)


@dataclass
class Study:
    name: str
    what: str
    device: str  # "cpu", "cuda", or "any" (--device, default cuda when there is one)
    cases: Callable  # opts -> list of case dicts, each with a "label"
    measure: Callable  # (case, opts) -> dict of measured values (opts.rows: the rows measured before)
    index: list  # table rows: [(key, header, format)]
    values: list  # table values: [(key, header, format)], one column each (per series value with `series`)
    headline: Callable  # rows -> one line for the report and the results index
    series: str | None = None  # the case key whose values become columns (impl: ours | SDPA | 0.1.9)
    plot: tuple = ()  # (x, y, panel keys, series key) over points(rows)
    points: Callable | None = None  # rows -> plotted points (default: the rows)
    finish: Callable | None = None  # rows -> None: adds values that compare rows (vs dense, efficiency)
    sdpa: Callable | None = None  # opts -> (batch, heads, seq_len, dim_head, causal) of the dense run to probe
    setup: Callable | None = None  # opts -> None, once before the cases (data preparation)
    baselines: tuple = ("ours", "SDPA")
    training: bool = False  # trains through the CLI: --runs, --timeout, --report-only, --jobs apply
    notes: list = field(default_factory=list)


def pick(rows: list[dict], **match) -> dict:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items()) and "error" not in r), {})


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def x(v) -> str:
    return "-" if v is None else f"{v:,.2f}x"


# ------------------------------------------------------------------------------------------ attention layer

DIM, HEADS, DIM_HEAD, BLOCK = 512, 8, 64, 128


def attention_cases(sizes, quick_sizes, sections, fwd_only=()):
    def cases(opts):
        impls = ["ours", "SDPA"] + ([] if opts.no_legacy else ["0.1.9"])
        out = []
        for section in sections:
            for causal in (False, True):
                for n in (quick_sizes if opts.quick else sizes + list(fwd_only)):
                    for impl in impls if section == "layer" else impls[:2]:
                        out.append({"label": f"{section} {impl} {'causal' if causal else 'non-causal'} {n}",
                                    "section": section, "impl": impl, "causal": causal, "n": n,
                                    "backward": n not in fwd_only})  # fmt: skip
        return out

    return cases


def attention_step(case: dict, device: str, backward: bool):
    """One forward (+ backward) of the attention core (B 1, H 8, N, D 64) or of one layer with its projections
    (dim 512, 8 x 64, block 128): float32 on the CPU, bf16 autocast on a GPU."""
    import torch

    n, causal, impl = case["n"], case["causal"], case["impl"]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(n)
    if case["section"] == "core":
        from h_transformer_1d import h_attention

        q, k, v = (torch.randn(1, HEADS, n, DIM_HEAD, generator=gen).to(device).requires_grad_(backward)
                   for _ in range(3))  # fmt: skip
        if impl == "ours":
            fn = lambda: h_attention(q, k, v, block_size=BLOCK, causal=causal)
        else:
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        shape = (1, HEADS, n, DIM_HEAD)
    else:
        pkg = import_package(legacy=impl == "0.1.9")
        if impl == "0.1.9":  # 0.1.9 exports only the model; its causal layer needs a power-of-two max_seq_len
            import h_transformer_1d.h_transformer_1d as old

            extra = {"max_seq_len": 1 << math.ceil(math.log2(n))} if causal else {}
            layer = (old.CausalHAttention1D if causal else old.HAttention1D)(
                DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK, **extra)  # fmt: skip
        else:
            cls = pkg.CausalHAttention1D if causal else pkg.HAttention1D
            layer = cls(DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK,
                        attention="dense" if impl == "SDPA" else "hierarchical")  # fmt: skip
        layer = layer.to(device)
        inp = torch.randn(1, n, DIM, generator=gen).to(device).requires_grad_(backward)
        fn = lambda: layer(inp)
        shape = (1, n, DIM)
    grad = torch.randn(shape, generator=gen).to(device)

    def step():
        with torch.set_grad_enabled(backward), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            out = fn()
        if backward:
            out.float().backward(grad)

    return step


def measure_attention(case: dict, opts) -> dict:
    row = {}
    for backward in (True, False) if opts.device == "cuda" else (True,):
        if backward and not case["backward"]:
            continue
        step = attention_step(case, opts.device, backward)
        key = "" if backward else "fwd_"
        t = time_fn(step, opts.device, opts.warmup, opts.reps or (1 if opts.quick else 5), opts.budget)
        row.update({f"{key}ms": t["ms"], f"{key}peak_mib": t["peak_mib"], f"{key}reps": t["reps"]})
        if opts.profile and backward:
            from common import profile_fn

            row["profile"] = profile_fn(step, opts.device)
    return row


def attention_headline(rows, ns=(4096, 16384, 131072)):
    measured = sorted({r["n"] for r in rows if r.get("ms")})
    parts, ns = [], [n for n in ns if n in measured] or measured[-1:]
    for n in ns:
        ours, dense = pick(rows, section="layer", impl="ours", causal=False, n=n), pick(
            rows, section="layer", impl="SDPA", causal=False, n=n)  # fmt: skip
        old = pick(rows, section="layer", impl="0.1.9", causal=False, n=n)
        if ours.get("ms"):
            parts.append(f"{n:,}: {ours['ms']:,.1f} ms vs SDPA {x(ratio(dense.get('ms'), ours['ms']))}"
                         + (f", vs 0.1.9 {x(ratio(old.get('ms'), ours['ms']))}" if old else ""))  # fmt: skip
    return "non-causal layer fwd+bwd, ours (speedup of ours): " + ("; ".join(parts) or "no common length measured")


ATTENTION = {
    "measure": measure_attention, "series": "impl", "baselines": ("ours", "SDPA", "0.1.9"),
    "index": [("section", "part", "s"), ("causal", "causal", ""), ("n", "N", ",")],
    "values": [("ms", "fwd+bwd ms", ",.2f"), ("fwd_ms", "fwd ms", ",.2f"), ("peak_mib", "MiB", ",.0f")],
    "plot": ("n", "ms", ["section", "causal"], "impl"),
    "sdpa": lambda opts: (1, HEADS, 1024 if opts.quick else 16384, DIM_HEAD, True),
}  # fmt: skip


# ----------------------------------------------------------------------------------------- kernel shapes

# (label, batch, heads, kv heads, N, head dim): the kernels issue's shapes (block 128): the long core, the short
# batched ones where training happens, wide and narrow heads, grouped-query and multi-query attention
KERNEL_SHAPES = [
    ("128k", 1, 8, 8, 131072, 64), ("2k x8", 8, 8, 8, 2048, 64), ("4k x8", 8, 8, 8, 4096, 64),
    ("16k d32", 1, 8, 8, 16384, 32), ("16k d128", 1, 8, 8, 16384, 128), ("16k d256", 1, 8, 8, 16384, 256),
    ("16k gqa 8/2 d128", 1, 8, 2, 16384, 128), ("64k mqa 8/1", 1, 8, 1, 65536, 64),
]
QUICK_KERNEL_SHAPES = [("1k", 1, 4, 4, 1024, 32), ("512 x2 gqa 4/2", 2, 4, 2, 512, 32)]


def kernel_cases(opts):
    return [{"label": f"{impl} {name} {'causal' if causal else 'non-causal'}", "impl": impl, "shape": name,
             "causal": causal, "b": b, "h": h, "hkv": hkv, "n": n, "d": d}
            for name, b, h, hkv, n, d in (QUICK_KERNEL_SHAPES if opts.quick else KERNEL_SHAPES)
            for causal in (False, True) for impl in ("ours", "SDPA")]  # fmt: skip


def scores_computed(n: int, causal: bool) -> int:
    """Scores per (batch, head) the window kernels compute: every level's rows against its window of key blocks
    (level 0: 3 blocks, causal 2; coarse levels: 2, causal 1), whole blocks, diagonal ones included."""
    from h_transformer_1d.attention import level_lengths
    from h_transformer_1d.attention.geometry import window_offsets

    return sum(rows * len(window_offsets(causal, min(level, 1))) * BLOCK
               for level, rows in enumerate(level_lengths(n, BLOCK)))  # fmt: skip


def kernel_profile(step, fwd_only) -> dict:
    """Device time of one profiled forward+backward split into the window kernels (forward, backward) and the
    rest (glue), and the kernels launched by the forward alone and by the whole step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def kernels(fn):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time_total > 0]

    events, fwd_events = kernels(step), kernels(fwd_only)
    total = lambda mark: sum(e.device_time_total for e in events if mark(e.name)) / 1e3
    per_kernel: dict = {}
    for e in events:
        per_kernel[e.name[:60]] = per_kernel.get(e.name[:60], 0.0) + e.device_time_total / 1e3
    return {"window_fwd_ms": total(lambda k: "window_fwd" in k), "window_bwd_ms": total(lambda k: "window_bwd" in k),
            "glue_ms": total(lambda k: "window" not in k), "busy_ms": total(lambda k: True),
            "launches_fwd": len(fwd_events), "launches_bwd": len(events) - len(fwd_events),
            "kernel_ms": sorted(([name, round(ms, 4)] for name, ms in per_kernel.items()), key=lambda kv: -kv[1])}  # fmt: skip


# Peak memory bandwidth of the cards the studies ran on (vendor figures), for the glue's share of it
CARD_BANDWIDTH = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12)]


def card_bandwidth() -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    return next((bw for card, bw in CARD_BANDWIDTH if card in name), None)


def glue_bytes(b: int, h: int, hkv: int, n: int, d: int, elt: int = 2) -> int:
    """Bytes the glue kernels move, as the kernels are built: coarsening reads q, k, v and writes every level of
    q and k, level 0 included, and the coarse levels of v (the window kernels read v itself at level 0); folding
    reads dO and O and writes every level of dO. (The tokens' gradients are written by the level-0 backward
    window kernels, counted with them.) Rows of counts, log-sum-exps and Delta (4 bytes each) left out."""
    from h_transformer_1d.attention import level_lengths

    lengths = level_lengths(n, BLOCK)
    mtot, m0 = sum(lengths), lengths[0]
    coarsen = (h + 2 * hkv) * n + (h + hkv) * mtot + hkv * (mtot - m0)
    return elt * d * b * (coarsen + h * (2 * n + mtot))


def measure_kernels(case: dict, opts) -> dict:
    """The attention core on (B, H, N, D) queries and (B, Hkv, N, D) keys and values, bf16 on a GPU (float32 on a
    CPU): forward+backward and forward time, peak memory, host time of an eager call; on a GPU the window kernels'
    rate per computed score (FlashAttention's convention: 4 D flops forward, 10 D backward) and the glue's time."""
    import torch

    from h_transformer_1d import h_attention

    dev, (b, h, hkv, n, d, causal) = opts.device, (case[k] for k in ("b", "h", "hkv", "n", "d", "causal"))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(b, h, n, d, generator=gen).to(dev, dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, generator=gen).to(dev, dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(b, h, n, d, generator=gen).to(dev, dtype)
    if case["impl"] == "ours":
        fn = lambda: h_attention(q, k, v, block_size=BLOCK, causal=causal)
    else:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fn = lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=hkv != h)

    def step():  # autograd.grad: no .grad to accumulate, so every kernel of the step is the attention's
        torch.autograd.grad(fn(), (q, k, v), grad)

    def fwd_only():
        with torch.no_grad():
            fn()

    reps = opts.reps or (1 if opts.quick else 10)
    t, tf = (time_fn(f, dev, opts.warmup, reps, opts.budget) for f in (step, fwd_only))
    host = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        step()  # kernels queue asynchronously: this is the host's own time (a sync inside would show up)
        host.append((time.perf_counter() - t0) * 1e3)
    sync(dev)
    base = reset_peak(dev)  # the steady state's peak: the first call's (time_fn) includes autotuning
    step()
    sync(dev)
    row = {"ms": t["ms"], "fwd_ms": tf["ms"], "peak_mib": peak_mib(dev, base), "host_ms": statistics.median(host)}
    scores = b * h * (scores_computed(n, causal) if case["impl"] == "ours" else n * n // (2 if causal else 1))
    row["tflops"] = 14 * d * scores / (t["ms"] * 1e9)
    if dev == "cuda":
        if case["impl"] == "ours":
            prof = kernel_profile(step, fwd_only)
            row.update(prof)
            row["fwd_tflops"] = 4 * d * scores / (prof["window_fwd_ms"] * 1e9) if prof["window_fwd_ms"] else None
            row["bwd_tflops"] = 10 * d * scores / (prof["window_bwd_ms"] * 1e9) if prof["window_bwd_ms"] else None
            row["glue_mb"] = glue_bytes(b, h, hkv, n, d) / 1e6
            row["glue_gbps"] = row["glue_mb"] / prof["glue_ms"] if prof["glue_ms"] else None  # MB per ms = GB/s
            bandwidth = card_bandwidth()
            row["glue_pct_bw"] = 100 * row["glue_gbps"] * 1e9 / bandwidth if bandwidth and row["glue_gbps"] else None
        row["tile_choices"] = chosen_tiles() if case["impl"] == "ours" else None
    return row


def chosen_tiles() -> list[str]:
    """The tiles the kernels launched with so far (autotuned or the first of each list)."""
    from h_transformer_1d.attention import triton_kernels as tk

    return sorted({f"{kernel.fn.__name__} {'x'.join(map(str, tk.tile_shape(config)))}"
                   for (kernel, *_), config in tk.CHOSEN_CONFIGS.items()})  # fmt: skip


def kernels_finish(rows: list[dict]) -> None:
    for r in rows:
        if r.get("impl") == "ours":
            dense = pick(rows, impl="SDPA", shape=r["shape"], causal=r["causal"])
            r["vs_sdpa"] = ratio(dense.get("ms"), r.get("ms"))


def kernels_headline(rows) -> str:
    parts = []
    for r in rows:
        if r.get("impl") == "ours" and r.get("ms") and r["shape"] in ("128k", "4k x8", "16k d256") and r["causal"]:
            parts.append(f"{r['shape']} {r['ms']:,.2f} ms ({x(r.get('vs_sdpa'))} SDPA)")
    return "causal core fwd+bwd, ours: " + ("; ".join(parts) or "see the table")


# ------------------------------------------------------------------------------ kernel resources (compiled)


def resource_cases(opts):
    """Each window kernel at level 0 and on the coarse levels with each of its tiles, and the glue kernels, at
    head dims 64 and 128, block 128, causal."""
    import os

    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels' module is imported: it decides what @jit makes
    from h_transformer_1d.attention import triton_kernels as tk

    cases = []
    for d in [64] if opts.quick else [64, 128]:
        for name, tiles in tk.WINDOW_TILES.items():
            for level0 in (True, False):
                for tile in tiles[:1] if opts.quick else tiles:
                    in_use = len(tile) < 5 or d <= tile[4]  # kept from wider heads (`fits_head`)
                    cases.append({"label": f"{name} {'level 0' if level0 else 'coarse'} d{d} "
                                           f"{'x'.join(map(str, tile[:4]))}{'' if in_use else f' (unused past d{tile[4]})'}",
                                  "kernel": name, "level0": level0, "d": d, "tile": list(tile[:4]),
                                  "in_use": in_use})  # fmt: skip
        for name in ("coarsen_kernel", "fold_kernel"):
            cases.append({"label": f"{name} d{d}", "kernel": name, "level0": None, "d": d, "tile": None})
    return cases


def _ptxas() -> str | None:
    import shutil

    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found = [tools / name for name in ("ptxas-blackwell", "ptxas") if (tools / name).is_file()]
    return str(found[0]) if found else shutil.which("ptxas")


def measure_resources(case: dict, opts) -> dict:
    """Compile one kernel for an H100 (sm_90a) without a GPU, then ask ptxas for its registers per thread and
    spilled bytes, with the shared memory Triton asks for: spills and register counts near 255 are what a
    kernel change must not add, and they show before any GPU run."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from h_transformer_1d.attention import triton_kernels as tk
    from h_transformer_1d.attention.fused import window_constants

    ptxas = _ptxas()
    if ptxas is None:
        return {"note": "skipped: no ptxas (Triton's bundled one or on PATH)"}
    kernel = getattr(tk, case["kernel"])
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    d, stages = case["d"], None
    if case["tile"]:
        bm, bn, warps, stages = case["tile"]
        first, step, num_win = window_constants(case["level0"], True)
        consts = {"NR": BLOCK, "D": d, "BLOCK_M": bm, "BLOCK_N": bn, "FIRST": first, "STEP": step, "NUM_WIN": num_win,
                  "LEVEL0": case["level0"], "CAUSAL": True, "UNIFORM": False, "FINAL": case["level0"],
                  "ROTARY": case["level0"]}  # fmt: skip
    else:
        coarsen = case["kernel"] == "coarsen_kernel"
        lvl, warps = (tk.COARSEN_LV, tk.COARSEN_WARPS) if coarsen else (tk.LV, tk.FOLD_WARPS)
        consts = {"D": d, "LVL": lvl, "RAW": True, "HAS_MASK": True, "CAUSAL": True, "ROTARY": True}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    # the kernels' parameters: lower case and these are integers, `scale` a float, the rest pointers
    ints = {"H", "G", "MTOT", "M0", "N", "ROW0", "TOP", "N_IN", "IN_ROW0", "BASE"}
    halves = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "XQ", "XK", "XV", "PQ", "PK", "PV", "PDO", "PDQ", "PDK", "PDV"}
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name == "scale":
            signature[name] = "fp32"
        elif name in ints or name.islower():
            signature[name] = "i32"
        elif name in halves:
            signature[name] = "*bf16"
        else:
            signature[name] = {"VALID": "*i1", "LO": "*i32", "HI": "*i32", "START": "*i32", "LEN": "*i32",
                               "PF": "*i32"}.get(name, "*fp32")  # fmt: skip
    options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options=options)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "kernel.ptx", Path(tmp) / "kernel.o"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(cubin)],
                                check=True, capture_output=True, text=True).stderr  # fmt: skip
        cuobjdump = Path(ptxas).with_name("cuobjdump")
        sass = (subprocess.run([str(cuobjdump), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
                if cuobjdump.is_file() else None)  # fmt: skip
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"warps": warps, "registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else None,
            "loop_spills": None if sass is None else spills_in_loops(sass),
            "shared_kib": compiled.metadata.shared / 1024}  # fmt: skip


def spills_in_loops(sass: str) -> int:
    """Local-memory loads and stores (STL, LDL: spilled registers) inside the loops of a kernel's SASS (as
    `cuobjdump -sass` prints it), a loop being the instructions from a backward branch's target to the branch.
    A spill in a prologue or epilogue runs once per program; one in the loops over key or query tiles runs at
    every step."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    inside = set()
    for addr, text in code:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            inside.update(a for a, _ in code if int(target.group(1), 16) <= a <= addr)
    return sum(1 for addr, text in code if addr in inside and re.search(r"\b(STL|LDL)\b", text))


def resources_headline(rows) -> str:
    used = [r for r in rows if r.get("in_use", True)]
    spilling = [r for r in used if r.get("spill_bytes")]
    worst = max(spilling, key=lambda r: r["spill_bytes"]) if spilling else None
    in_loops = [r for r in used if r.get("loop_spills")]
    return (f"{len(spilling)} of {len(used)} kernels and tiles in use spill registers"
            + (f" (most: {worst['label']}, {worst['spill_bytes']} bytes)" if worst else "")
            + f", {len(in_loops)} of them inside their loops"
            + f"; {len(rows) - len(used)} more tiles are kept from the head dims where they spill")


# ------------------------------------------------------------------------------------------- host overhead

HOST_SHAPES = [(1024, 1), (2048, 8), (4096, 8)]  # (N, batch)


def host_cases(opts):
    shapes = [(256, 2)] if opts.quick else HOST_SHAPES
    return [{"label": f"{impl} {n // 1024 if n >= 1024 else n}{'k' if n >= 1024 else ''} x{b} "
                      f"{'causal' if causal else 'non-causal'}", "impl": impl, "shape": f"{n} x{b}", "n": n, "b": b,
             "causal": causal} for n, b in shapes for causal in (False, True) for impl in ("ours", "SDPA")]  # fmt: skip


def measure_host(case: dict, opts) -> dict:
    """One attention layer with its projections (dim 512, 8 x 64, block 128; bf16 autocast on a GPU), eager
    forward+backward: the wall time per step of steps issued back to back, the host's time to issue one step
    (after a sync, so nothing waits for the GPU), and on a GPU the kernels' busy time of one step (profiler)
    and wall / busy: 1 when the GPU never waits for the host."""
    import torch

    from h_transformer_1d import CausalHAttention1D, HAttention1D

    dev, n, b, causal = opts.device, case["n"], case["b"], case["causal"]
    torch.manual_seed(0)
    layer = (CausalHAttention1D if causal else HAttention1D)(
        DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK, attention="dense" if case["impl"] == "SDPA" else
        "hierarchical").to(dev)  # fmt: skip
    inp = torch.randn(b, n, DIM, device=dev, requires_grad=True)
    grad = torch.randn(b, n, DIM, device=dev)

    def step():
        with torch.autocast(dev, torch.bfloat16, enabled=dev == "cuda"):
            out = layer(inp)
        torch.autograd.grad(out.float(), (inp, *layer.parameters()), grad)

    reps = opts.reps or (3 if opts.quick else 50)
    for _ in range(max(2, opts.warmup)):
        step()
    sync(dev)
    host = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync(dev)
    row = {"wall_ms": (time.perf_counter() - t0) * 1e3 / reps, "host_ms": statistics.median(host)}
    if dev == "cuda":
        row["busy_ms"] = kernel_profile(step, step)["busy_ms"]
        row["wall_vs_busy"] = ratio(row["wall_ms"], row["busy_ms"])
    return row


def host_headline(rows) -> str:
    r = pick(rows, impl="ours", n=4096, b=8, causal=True) or pick(rows, impl="ours", causal=True)
    if not r.get("wall_ms"):
        return "see the table"
    busy = f", GPU busy {r['busy_ms']:.2f} ms (wall / busy {r['wall_vs_busy']:.2f})" if r.get("busy_ms") else ""
    kind = "causal" if r["causal"] else "non-causal"
    return f"ours, {r['shape']} {kind}: wall {r['wall_ms']:.2f} ms per step, host {r['host_ms']:.2f} ms{busy}"


# ------------------------------------------------------------------------------- length ratios (pairs)

PAIRS = [("ours", 4096, 4097, 1.2), ("ours", 8192, 32768, 4.5), ("SDPA", 4096, 4097, None)]
QUICK_PAIRS = [("ours", 256, 257, 1.2), ("ours", 256, 1024, 4.5), ("SDPA", 256, 257, None)]


def length_ratio_cases(opts):
    return [{"label": f"{impl} {b}/{a} {'causal' if c else 'non-causal'}", "impl": impl, "pair": f"{b:,} / {a:,}",
             "n_a": a, "n_b": b, "causal": c, "target": t}
            for impl, a, b, t in (QUICK_PAIRS if opts.quick else PAIRS) for c in (False, True)]  # fmt: skip


def measure_length_ratio(case: dict, opts) -> dict:
    """Both lengths in this process, alternating A B B A ... so that drift and other processes' load hit both."""
    steps = [attention_step({**case, "section": "core", "n": n}, "cpu", True) for n in (case["n_a"], case["n_b"])]
    for step in steps:
        step()
    rounds = opts.reps or (2 if opts.quick else 15)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            steps[i]()
            times[i].append((time.perf_counter() - t0) * 1e3)
    per_round = statistics.median(b / a for a, b in zip(*times))
    row = {"times_a": times[0], "times_b": times[1], "ms_a": statistics.median(times[0]),
           "ms_b": statistics.median(times[1]), "ratio_of_minimums": min(times[1]) / min(times[0]),
           "median_round_ratio": per_round}  # fmt: skip
    if case["target"] is not None:  # met when neither the least disturbed runs nor the typical round exceed it
        row["meets_target"] = max(row["ratio_of_minimums"], per_round) <= case["target"]
    return row


def length_ratio_headline(rows):
    return "; ".join(f"{r['impl']} {r['pair']}{' causal' if r['causal'] else ''}: {r['median_round_ratio']:.3f}"
                     + (f" (target <= {r['target']}: {'met' if r['meets_target'] else 'NOT met'})" if r["target"] else "")
                     for r in rows if "median_round_ratio" in r)  # fmt: skip


# ------------------------------------------------------------------------------------------------ decoding

DECODE_MODEL = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4, "dim_head": 64, "block_size": 128}


def decode_cases(contexts, quick_contexts, impls):
    def cases(opts):
        ctx = quick_contexts if opts.quick else contexts
        chosen = [i for i in impls if not (opts.no_legacy and i == "0.1.9")]
        return [{"label": f"{impl} {c}", "impl": impl, "context": c, "max_context": max(ctx)}
                for c in ctx for impl in chosen]  # fmt: skip

    return cases


def measure_decode(case: dict, opts) -> dict:
    """cached: prefill, then one token at a time (CPU: decode_step; CUDA: StaticDecoder, a CUDA graph per token;
    eager: decode_step on CUDA); uncached / 0.1.9: generate recomputing the whole context per token."""
    import torch

    impl, context, device = case["impl"], case["context"], opts.device
    legacy = impl == "0.1.9"
    if impl not in ("cached", "eager"):  # recomputing: k tokens, fewer if the last context's time says k won't fit
        k = opts.reps or (2 if opts.quick else 16 if device == "cuda" else 4)
        before = [r for r in opts.rows if r.get("impl") == impl and r.get("ms_per_token")]
        if before:
            estimate = before[-1]["ms_per_token"] * context / before[-1]["context"] / 1e3
            if estimate > opts.budget:
                return {"note": f"skipped: about {estimate:.0f} s per token"}
            k = max(1, min(k, int(opts.budget / estimate)))
    pkg = import_package(legacy)
    if legacy:
        from h_transformer_1d.autoregressive_wrapper import AutoregressiveWrapper
    else:
        from h_transformer_1d import AutoregressiveWrapper
    torch.manual_seed(0)
    model = pkg.HTransformer1D(**DECODE_MODEL, max_seq_len=case["max_context"], causal=True).to(device).eval()
    prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(1)).to(device)
    if impl in ("cached", "eager"):
        from h_transformer_1d.model import StaticDecoder, decode_step, prefill

        warm, tokens = 8, opts.reps or (8 if opts.quick else 256)
        with torch.no_grad():
            t0 = time.perf_counter()
            logits, cache = prefill(model, prompt)
            sync(device)
            prefill_s = time.perf_counter() - t0
            graph = device == "cuda" and impl == "cached"
            decoder = StaticDecoder(model, cache, context + warm + tokens + 1) if graph else None
            nxt, times = logits[:, -1].argmax(-1), []
            for i in range(warm + tokens):
                t0 = time.perf_counter()
                nxt = (decoder.step(nxt) if decoder else decode_step(model, cache, nxt)).argmax(-1)
                sync(device)
                if i >= warm:
                    times.append((time.perf_counter() - t0) * 1e3)
        state = getattr(decoder or cache, "stored_tensors", list)()
        return {"ms_per_token": statistics.fmean(times), "median_ms": statistics.median(times), "max_ms": max(times),
                "tokens": tokens, "prefill_s": prefill_s,
                "cache_mib": sum(t.numel() * t.element_size() for t in state) / 2**20 or None}  # fmt: skip
    wrapper = AutoregressiveWrapper(model)
    kwargs = {} if legacy else {"use_cache": False, "temperature": 0.0}
    with torch.no_grad():
        wrapper.generate(prompt if device == "cuda" else prompt[:, :512], 1, **kwargs)  # warm-up, untimed
        sync(device)
        t0 = time.perf_counter()
        wrapper.generate(prompt, k, **kwargs)
        sync(device)
    return {"ms_per_token": (time.perf_counter() - t0) * 1e3 / k, "tokens": k}


def decode_headline(rows):
    cached = sorted((r["context"], r["ms_per_token"]) for r in rows if r.get("impl") == "cached" and "ms_per_token" in r)
    if not cached:
        return "no cached run measured"
    (c0, t0), (c1, t1) = cached[0], cached[-1]
    line = f"cached {t1:.2f} ms/token at {c1:,} context, {t1 / t0:.2f}x its time at {c0:,}"
    for c, _ in reversed(cached):
        old = pick(rows, impl="0.1.9", context=c).get("ms_per_token")
        if old:
            return line + f"; {old / pick(rows, impl='cached', context=c)['ms_per_token']:,.0f}x faster than 0.1.9 at {c:,}"
    return line


DECODE = {
    "measure": measure_decode, "series": "impl", "baselines": ("ours cached", "ours uncached", "0.1.9"),
    "index": [("context", "context", ",")],
    "values": [("ms_per_token", "ms/token", ",.2f"), ("max_ms", "max ms", ",.2f"), ("prefill_s", "prefill s", ",.2f"),
            ("cache_mib", "cache MiB", ",.1f"), ("tokens", "tokens", ""), ("note", "note", "")],
    "headline": decode_headline, "plot": ("context", "ms_per_token", [], "impl"),
}  # fmt: skip


# -------------------------------------------------------------------------- whole-model training steps


def measure_train_step(case: dict, opts) -> dict:
    """AdamW steps of the base model (12 x 512, 8 x 64) on one fixed batch of random bytes, bf16 autocast:
    eager, torch.compile, or torch.compile with CUDA graphs (mode reduce-overhead)."""
    import torch

    from h_transformer_1d import AutoregressiveWrapper, HTransformer1D

    ctx, batch = (128, 4) if opts.quick else (4096, 8)
    size = {"dim": 64, "depth": 2, "heads": 2, "dim_head": 32} if opts.quick else {"dim": 512, "depth": 12, "heads": 8, "dim_head": 64}
    torch.manual_seed(0)
    net = HTransformer1D(num_tokens=256, **size, max_seq_len=ctx, causal=True, shift_tokens=True,
                         block_size=case["block"] or 128, attention=case["attention"])  # fmt: skip
    model = AutoregressiveWrapper(net).to(opts.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    mode = {"eager": None, "default": "default", "reduce-overhead": "reduce-overhead"}[case["mode"]]
    run = model if mode is None else torch.compile(model, mode=mode)
    data = torch.randint(0, 256, (batch, ctx + 1), device=opts.device)
    losses = []

    def step():
        with torch.autocast(opts.device, torch.bfloat16, enabled=opts.device == "cuda"):
            loss = run(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    try:  # 3 untimed steps: compilation, graph recording
        t = time_fn(step, opts.device, warmup=3, reps=opts.reps or (3 if opts.quick else 20), budget_s=opts.budget)
    finally:
        torch.compiler.reset()
    return {"ms_per_step": t["ms"], "tokens_per_s": batch * ctx / t["ms"] * 1e3, "loss": float(losses[-1]),
            "params": sum(p.numel() for p in net.parameters())}  # fmt: skip


def cuda_graph_cases(opts):
    blocks = [16] if opts.quick else [512]
    kinds = [("dense", None)] + [("hierarchical", b) for b in blocks]
    return [{"label": f"{a}{f', block {b}' if b else ''} {m}", "attention": a, "block": b, "mode": m,
             "config": f"{a}, block {b}" if b else "dense (SDPA)"}
            for a, b in kinds for m in ("eager", "default", "reduce-overhead")]  # fmt: skip


def vs_dense(rows, key, same=("mode",), out="vs_dense"):
    """Each row's `key` over that of the dense row with the same `same` keys."""
    for r in rows:
        dense = pick(rows, attention="dense", **{k: r.get(k) for k in same})
        r[out] = ratio(r.get(key), dense.get(key))


def cuda_graphs_finish(rows):
    vs_dense(rows, "tokens_per_s")
    base = pick(rows, attention="dense", mode="eager").get("tokens_per_s")
    for r in rows:
        r["vs_dense_eager"] = ratio(r.get("tokens_per_s"), base)


def cuda_graphs_headline(rows):
    best = max((r for r in rows if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"], default=None)
    eager = pick(rows, attention="hierarchical", mode="eager")
    return (f"hierarchical eager {x(eager.get('vs_dense'))} dense eager; fastest: {best['config']} {best['mode']}, "
            f"{best['tokens_per_s']:,.0f} tokens/s ({x(best.get('vs_dense_eager'))} dense eager)") if best else "-"


# ----------------------------------------------------------------- packed documents vs padded batches


def pack_cases(opts):
    return [{"label": batching, "batching": batching} for batching in ("packed", "padded")]


def measure_pack(case: dict, opts) -> dict:
    """Training steps (AdamW, bf16 autocast on a GPU) on the default corpus's documents as `train --pack`
    draws them: `packed` runs each step's rows back to back with cu_seqlens (what --pack trains), `padded`
    the very same document pieces as a padded batch, each padded to the longest piece of its step. Tokens/s
    counts predicted bytes, the same in both (batch x context per step)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from h_transformer_1d import AutoregressiveWrapper, HTransformer1D
    from h_transformer_1d.apps import data
    from h_transformer_1d.attention.varlen import VarlenLayout

    if opts.quick:
        ctx, batch, block, size = 128, 4, 16, {"dim": 64, "depth": 2, "heads": 2, "dim_head": 32}
    else:
        ctx, batch, block, size = 4096, 8, 128, {"dim": 512, "depth": 12, "heads": 8, "dim_head": 64}
    corpus = data.load_corpus(QUICK_DATA[1] if opts.quick else None)
    pieces = data.document_pieces(corpus, ctx)
    steps = [data.train_pack(corpus.train, pieces, ctx, batch, seed=0, step=s) for s in range(1, 9)]
    torch.manual_seed(0)
    net = HTransformer1D(num_tokens=256, **size, max_seq_len=ctx, causal=True, shift_tokens=True, block_size=block)
    model = AutoregressiveWrapper(net).to(opts.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = []  # per step: (positional args, keyword args) of the loss, made before the timing
    for b in steps:
        if case["batching"] == "packed":
            _, cu, longest = b.rows(0, batch)
            inputs.append(((b.tokens.to(opts.device).long(),), {"cu_seqlens": cu, "max_seqlen": longest}))
        else:
            rows = pad_sequence(list(b.tokens.split(b.lengths)), batch_first=True).to(opts.device).long()
            mask = (torch.arange(rows.shape[1]) < torch.tensor(b.lengths)[:, None]).to(opts.device)
            inputs.append(((rows,), {"mask": mask}))
    turn = iter(range(10**9))

    def step():
        args, kwargs = inputs[next(turn) % len(inputs)]
        with torch.autocast(opts.device, torch.bfloat16, enabled=opts.device == "cuda"):
            loss = model(*args, **kwargs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t = time_fn(step, opts.device, warmup=2, reps=opts.reps or (4 if opts.quick else 16), budget_s=opts.budget)
    # slots per predicted byte: the padded batch's rows, or the attention's padded buckets when packed
    if case["batching"] == "packed":
        layouts = [VarlenLayout([n - 1 for n in b.lengths], block) for b in steps]
        slots = sum(bs * n for layout in layouts for bs, n in layout.shapes)
    else:
        slots = sum(len(b.lengths) * (max(b.lengths) - 1) for b in steps)
    return {"ms_per_step": t["ms"], "tokens_per_s": batch * ctx / t["ms"] * 1e3, "context": ctx,
            "pieces_per_step": statistics.mean(len(b.lengths) for b in steps),
            "padding_pct": 100 * (1 - len(steps) * batch * ctx / slots), "peak_mib": t.get("peak_mib")}  # fmt: skip


def pack_finish(rows):
    padded = pick(rows, batching="padded").get("tokens_per_s")
    for r in rows:
        r["vs_padded"] = ratio(r.get("tokens_per_s"), padded)


def pack_headline(rows):
    packed = pick(rows, batching="packed")
    return (f"packed {packed['tokens_per_s']:,.0f} tokens/s, {x(packed.get('vs_padded'))} padded batches of the same "
            "documents (target 1.3x)") if packed.get("tokens_per_s") else "-"


# ------------------------------------------------------------------- training through the CLI (subprocesses)

QUICK_MODEL = ["--dim", "64", "--depth", "2", "--heads", "2", "--dim-head", "32", "--block-size", "16"]
QUICK_DATA = ["--data", str(Path(__file__).resolve().parents[1] / "h_transformer_1d")]  # small: loads in no time


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "h_transformer_1d", *map(str, args)]


def train(command: list[str], run_dir: Path, case: dict, opts, env: dict | None = None) -> int | None:
    """Run one training command into run_dir (None with --report-only: the run directory is only read)."""
    if opts.report_only:
        return None
    if getattr(opts, "resume", False) and (run_dir / "checkpoints").is_dir():
        command = [*command, "--resume"]  # the same flags: the model's are checked, the training's applied
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # train refuses an existing run without --resume
    extra = dict(env or {})
    if "gpu" in case:  # --jobs: one queue per GPU
        extra["CUDA_VISIBLE_DEVICES"] = str(case["gpu"])
    if opts.device == "cpu":
        extra.setdefault("OMP_NUM_THREADS", str(opts.threads or 1))
    log = run_dir / ("train.log" if "--resume" not in command else f"train-resumed-{time.strftime('%Y%m%d-%H%M%S')}.log")
    return run_logged(command, log, child_env(extra), opts.timeout)


def status(rc: int | None, finished: bool) -> str:
    return "done" if finished and rc in (0, None) else "stopped" if rc in (0, None) else f"failed (exit {rc})"


def quality_cases(opts):
    return [{"label": a, "attention": a} for a in ("hierarchical", "dense")]


def quality_train_args(opts) -> list[str]:
    if opts.quick:
        args = ["--preset", "tiny", *QUICK_MODEL, *QUICK_DATA, "--seq-len", "128", "--batch-size", "4", "--steps", "8",
                "--warmup-steps", "2", "--eval-every", "4", "--eval-batches", "1"]  # fmt: skip
    else:
        args = ["--preset", "base", "--block-size", "512", "--seq-len", "4096", "--batch-size", "8", "--steps",
                "600", "--warmup-steps", "40", "--lr", "1e-3", "--eval-every", "50", "--eval-batches", "8"]  # fmt: skip
    return args + ["--seed", str(opts.seed), "--sample-every", "0", "--device", opts.device, *opts.extra]


def measure_quality(case: dict, opts) -> dict:
    """The same training run (model, data, schedule, seed: the same initial weights and batches) with hierarchical
    or dense attention; bits per byte on the validation windows during training and, at the end, on the whole
    validation split."""
    run_dir = opts.runs / case["label"]
    rc = train(cli("train", *quality_train_args(opts), "--attention", case["attention"], "--out", run_dir), run_dir,
               case, opts)  # fmt: skip
    metrics = read_metrics(run_dir)
    if not metrics:
        return {"error": f"no metrics.csv in {run_dir}" + (f" (exit {rc})" if rc else "")}
    config = run_config(run_dir)
    row = {"status": status(rc, metrics[-1]["step"] == config.get("steps")), "steps": metrics[-1]["step"],
           "evals": [[m["step"], m["val_bpb"], m["tokens"]] for m in metrics if m.get("val_bpb") is not None],
           "config": config, "throughput": steady_throughput(metrics, 2 if opts.quick else 20)}  # fmt: skip
    row["tokens_per_s"] = (row["throughput"] or {}).get("tokens_per_s")
    if not opts.quick and not opts.report_only and rc == 0:
        done = run_logged(cli("evaluate", "--checkpoint", run_dir, "--split", "val", "--device", opts.device),
                          run_dir / "evaluate.log", child_env(), opts.timeout)  # fmt: skip
        found = re.search(r"val bits per byte: ([\d.]+)", (run_dir / "evaluate.log").read_text())
        row["full_val_bpb"] = float(found.group(1)) if done == 0 and found else None
    return row


def quality_finish(rows):
    """Bits per byte at the last evaluation both runs reached (the same tokens seen), and the speed ratio."""
    runs = {r["label"]: r for r in rows if "evals" in r}
    if set(runs) != {"hierarchical", "dense"}:
        return
    common = sorted({e[0] for e in runs["hierarchical"]["evals"]} & {e[0] for e in runs["dense"]["evals"]})
    for r in runs.values():
        r["at_step"] = common[-1] if common else None
        r["bpb_at"] = next((e[1] for e in r["evals"] if e[0] == r["at_step"]), None)
    h, d = runs["hierarchical"], runs["dense"]
    h["bpb_vs_dense_pct"] = (h["bpb_at"] / d["bpb_at"] - 1) * 100 if h["bpb_at"] and d["bpb_at"] else None
    h["speed_vs_dense"] = ratio(h.get("tokens_per_s"), d.get("tokens_per_s"))
    h["target_met"] = (h["bpb_vs_dense_pct"] is not None and h["speed_vs_dense"] is not None
                       and h["bpb_vs_dense_pct"] <= 3 and h["speed_vs_dense"] >= 1.5)  # fmt: skip


def quality_headline(rows):
    h = pick(rows, label="hierarchical")
    if h.get("bpb_vs_dense_pct") is None:
        return "no comparison (a run is missing)"
    return (f"hierarchical vs dense at step {h['at_step']}: bits per byte {h['bpb_vs_dense_pct']:+.2f}%, "
            f"training tokens/s {x(h['speed_vs_dense'])} (target <= +3% at >= 1.5x: "
            f"{'met' if h['target_met'] else 'NOT met'})")


def bench_cases(opts):
    contexts, blocks = ([128, 256], [16]) if opts.quick else ([4096, 16384], [512])
    modes = ["eager"] if opts.quick else ["eager", "compile"]
    return [{"label": f"{c} {m} {a}" + (f" {b}" if b else ""), "context": c, "mode": m, "attention": a, "block": b,
             "config": f"{a}, block {b}" if b else "dense (SDPA)"}
            for c in contexts for m in modes for a, b in [("dense", None)] + [("hierarchical", b) for b in blocks]]


def measure_bench(case: dict, opts) -> dict:
    """The CLI's `bench`: timed AdamW steps on random bytes, the same tokens per step at every context."""
    per_step = 512 if opts.quick else 32768
    if per_step % case["context"]:
        return {"error": f"context {case['context']} does not divide {per_step} tokens per step"}
    model = ["--preset", "tiny", *QUICK_MODEL[:-2]] if opts.quick else ["--preset", "base"]
    command = cli("bench", *model, "--seq-len", case["context"], "--batch-size", per_step // case["context"],
                  "--steps", opts.reps or (3 if opts.quick else 20), "--attention", case["attention"],
                  "--device", opts.device, *(["--block-size", case["block"]] if case["block"] else []),
                  *(["--compile"] if case["mode"] == "compile" else []), *opts.extra)  # fmt: skip
    run_dir = opts.runs / case["label"].replace(" ", "_")
    rc = train(command, run_dir, case, opts)
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    found = re.search(rf"^{case['attention']}\s+([\d.,]+)\s+([\d,]+)\s+([\d,]+)", log, re.MULTILINE)
    params = re.search(r"bench: ([\d.]+M) parameters", log)
    if not found:
        return {"error": f"bench exit {rc}: {log.strip().splitlines()[-1:] or ['no output']}"}
    ms, tps, mib = (float(v.replace(",", "")) for v in found.groups())
    return {"batch_size": per_step // case["context"], "ms_per_step": ms, "tokens_per_s": tps, "peak_mib": mib,
            "params": params.group(1) if params else None}  # fmt: skip


def train_speed_headline(rows):
    best = [r for r in rows if r.get("vs_dense") and r["attention"] == "hierarchical"]
    return "; ".join(f"{r['context']:,} {r['mode']}: {r['config']} {x(r['vs_dense'])} dense tokens/s"
                     for r in best if r is max((b for b in best if b["context"] == r["context"]
                                                and b["mode"] == r["mode"]), key=lambda b: b["vs_dense"]))


def scaling_cases(opts):
    """K processes in increasing order; with K = 1 among others, the 1-process run once more at the end, so
    that a slow first run (cold caches, clocks, autotuning on disk) shows as the spread of the two."""
    ks = sorted(set(opts.gpus or ([1, 2] if opts.quick else [1, 2, 4])))
    cases = [{"label": f"k{k}", "k": k, "run": "first" if k == 1 else ""} for k in ks]
    if 1 in ks and len(ks) > 1:
        cases.append({"label": "k1-last", "k": 1, "run": "last"})
    return cases


def measure_scaling(case: dict, opts) -> dict:
    """Weak scaling: the same per-process batch on K processes (DDP through torch.distributed.run)."""
    k, per_gpu, steps = case["k"], 4 if opts.quick else 8, 10 if opts.quick else 20
    if opts.device == "cuda":
        import torch

        if k > torch.cuda.device_count():
            return {"note": f"skipped: {torch.cuda.device_count()} GPU(s) visible"}
    model = ["--preset", "tiny", *QUICK_MODEL, *QUICK_DATA, "--seq-len", "128"] if opts.quick else ["--preset", "base"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k),
               *cli("train", *model, "--batch-size", k * per_gpu, "--steps", steps, "--eval-every", steps,
                    "--eval-batches", 1, "--sample-every", 0, "--device", opts.device, *opts.extra)[1:],
               "--out", str(opts.runs / case["label"])]  # fmt: skip
    rc = train(command, opts.runs / case["label"], case, opts)
    metrics = read_metrics(opts.runs / case["label"])
    log = (opts.runs / case["label"] / "train.log").read_text(errors="replace")
    processes = re.search(r"training: (\d+) process", log)
    t = steady_throughput(metrics, 4 if opts.quick else 6)  # warm-up: CUDA and Triton initialisation, DDP buckets
    if not t:
        return {"error": f"exit {rc}, no steps logged: {log.strip().splitlines()[-1:]}"}
    return {"status": status(rc, metrics[-1]["step"] == steps), "global_batch": k * per_gpu,
            "processes": int(processes.group(1)) if processes else None, "tokens_per_s": t["tokens_per_s"],
            "tokens_per_s_per_gpu": t["tokens_per_s"] / k, "step_ms": t["step_ms_median"],
            "steps_used": t["steps_used"], "warmup_excluded": t["warmup_excluded"]}  # fmt: skip


def scaling_finish(rows):
    """Speedup and efficiency against the better of the 1-process runs; each 1-process run's efficiency
    is then its share of the better one (the run-to-run spread)."""
    one = max((r["tokens_per_s"] for r in rows if r.get("k") == 1 and r.get("tokens_per_s")), default=None)
    for r in rows:
        r["speedup"] = ratio(r.get("tokens_per_s"), one)
        r["efficiency"] = r["speedup"] / r["k"] if r["speedup"] else None


def scaling_headline(rows) -> str:
    parts = [f"K={r['k']}: {r['tokens_per_s']:,.0f} tokens/s, efficiency {r['efficiency']:.0%}"
             for r in rows if r.get("efficiency") and r["k"] > 1]  # fmt: skip
    ones = [r["tokens_per_s"] for r in rows if r.get("k") == 1 and r.get("tokens_per_s")]
    if ones:
        spread = f" (spread {1 - min(ones) / max(ones):.1%})" if len(ones) > 1 else ""
        parts.insert(0, f"K=1: {' / '.join(f'{t:,.0f}' for t in ones)} tokens/s{spread}")
    return "; ".join(parts)


LRA_LR = ["--lr", "0.00158114", "--grad-clip", "0"]  # LRA's optimizer: peak 0.05 / sqrt(1000), no clipping
LRA_VARIANTS = {
    "hier": ([], "the recipe: hierarchical attention, Nr = 16, <cls> pooling, peak lr 1.5e-4, clipping at 1"),
    "dense": (["--attention", "dense"], "the same model with dense attention (SDPA)"),
    "hier-seed1": (["--seed", "1"], "another initialization and batch order"),
    "hier-block32": (["--block-size", "32"], "block size Nr = 32"),
    "hier-lr5e-4": (["--lr", "5e-4"], "peak lr 5e-4"),
    "dense-lr5e-4": (["--attention", "dense", "--lr", "5e-4"], "dense, peak lr 5e-4"),
    "hier-lra-lr": (LRA_LR, "LRA's optimizer: peak lr 1.58e-3, no clipping"),
    "dense-lra-lr": (["--attention", "dense", *LRA_LR], "dense, LRA's optimizer"),
    "hier-lra-lr-seed1": (["--seed", "1", *LRA_LR], "LRA's optimizer, another seed"),
    "hier-lra-lr-block32": (["--block-size", "32", *LRA_LR], "LRA's optimizer, Nr = 32"),
    "hier-lra-lr-10k-steps": (["--steps", "10000", *LRA_LR], "LRA's optimizer, twice the steps"),
    "hier-mean-lra-lr": (["--pool", "mean", *LRA_LR], "mean pooling over the real tokens, LRA's optimizer"),
    "dense-mean-lra-lr": (["--attention", "dense", "--pool", "mean", *LRA_LR], "dense, mean pooling, LRA's optimizer"),
    "hier-mean-lra-lr-block32": (["--pool", "mean", "--block-size", "32", *LRA_LR], "mean pooling, Nr = 32"),
    "hier-mean-lra-lr2x": (["--pool", "mean", "--lr", "0.0031623", "--grad-clip", "0"],
                           "mean pooling, twice LRA's peak learning rate"),
}  # fmt: skip
# Recipe A (no pretraining) and Recipe B (masked-token pretraining, then fine-tuning from it) at the small size
# (6 x 128), which fits a GPU session's time; an epoch budget with cosine decay, so a run spreads over sessions
# with --resume. `pre-*` runs are `lra listops pretrain`; `b-*` start from the `pre-*` run of their attention.
SMALL = ["--depth", "6", "--dim", "128", "--heads", "4", "--dim-head", "32"]
OPTIM = ["--epochs", "20", "--schedule", "cosine", "--warmup-steps", "1000", "--lr", "5e-4", "--weight-decay", "0.01",
         "--grad-clip", "1"]  # fmt: skip
RECIPE_A = [*SMALL, *OPTIM, "--shuffle-operands", "--pool", "mean", "--eval-every", "1000"]
for att, name in (("hierarchical", "hier"), ("dense", "dense")):
    LRA_VARIANTS[f"a-small-{name}"] = (["--attention", att, *RECIPE_A], f"Recipe A, 6 x 128, {att}")
    LRA_VARIANTS[f"pre-small-{name}"] = (["--attention", att, *SMALL, *OPTIM, "--eval-every", "2000"],
                                         f"Recipe B's masked-token pretraining, 6 x 128, {att}")  # fmt: skip
    LRA_VARIANTS[f"b-small-{name}"] = (["--attention", att, *RECIPE_A, "--init-from", f"{{runs}}/pre-small-{name}"],
                                       f"Recipe B: Recipe A from the pretraining pre-small-{name}")  # fmt: skip
LRA_QUICK = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "64", "--block-size", "4",
             "--batch-size", "8", "--steps", "6", "--eval-every", "3", "--warmup-steps", "2"]  # fmt: skip
LRA_QUICK_DATA = ["--num-train", "64", "--num-val", "16", "--num-test", "16", "--min-length", "10", "--max-length", "60"]


def lra_setup(opts):
    if not opts.report_only and not (opts.runs / "data" / "basic_test.tsv").is_file():
        command = cli("lra", "listops", "prepare", "--out", opts.runs / "data", *(LRA_QUICK_DATA if opts.quick else []))
        if run_logged(command, opts.runs / "prepare.log", child_env(), opts.timeout) != 0:
            raise RuntimeError(f"lra listops prepare failed: see {opts.runs / 'prepare.log'}")


def measure_lra(case: dict, opts) -> dict:
    """One variant of `lra listops train` (the recipe's defaults plus the variant's flags), read back from its run
    directory: results.json (test accuracy of the final model) and metrics.csv (a run stopped early)."""
    label = case["label"]
    run_dir = opts.runs / label
    flags = [f.replace("{runs}", str(opts.runs)) for f in LRA_VARIANTS[label][0]]
    if opts.quick:  # the quick sizes and budget win (the last of a repeated flag counts); --steps replaces --epochs
        flags = [f for i, f in enumerate(flags) if "--epochs" not in flags[max(i - 1, 0) : i + 1]] + LRA_QUICK
    verb = "pretrain" if label.startswith("pre-") else "train"
    command = cli("lra", "listops", verb, "--data", opts.runs / "data", "--out", run_dir, *flags,
                  "--device", opts.device)  # fmt: skip
    rc = train(command, run_dir, case, opts)
    metrics = read_metrics(run_dir, require=("train_loss",))
    if not metrics:
        return {"error": f"no metrics.csv in {run_dir}" + (f" (exit {rc})" if rc else "")}
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    val = [(m["step"], m["val_acc"]) for m in metrics if m.get("val_acc") is not None]
    best = max(val, key=lambda sv: (sv[1], -sv[0])) if val else (None, None)
    nan = next((m["step"] for m in metrics if not math.isfinite(m.get("train_loss") or 0.0)), None)
    notes = ([] if results else [f"unfinished: {len(metrics)} steps logged"]) + ([f"loss NaN from step {nan}"] if nan else [])
    return {"flags": " ".join(LRA_VARIANTS[label][0]) or "(recipe)", "about": LRA_VARIANTS[case["label"]][1], "finished": bool(results),
            "test_accuracy": results.get("test_accuracy"), "best_test_accuracy": results.get("best_test_accuracy"),
            "final_val_accuracy": val[-1][1] if val else None,
            "best_val_accuracy": best[1], "best_val_step": best[0], "val_curve": val,
            "train_min": (results.get("train_time_s") or metrics[-1].get("elapsed_s") or 0) / 60,
            "examples_per_s": results.get("train_examples_per_s"), "peak_gib": results.get("peak_memory_gib"),
            "card": results.get("device"), "note": "; ".join(notes)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the registry

STUDIES = {s.name: s for s in [
    Study("attention_cpu", "hierarchical attention core and one layer with its projections, forward+backward in "
          "float32 on the CPU: time and peak RSS against N (block 128, 8 heads x 64, layer dim 512)", "cpu",
          attention_cases([1024, 2048, 4096, 4097, 8192, 16384, 32768], [256, 512], ["core", "layer"]),
          headline=lambda rows: attention_headline(rows, (4096, 16384, 32768)), **ATTENTION),
    Study("attention_gpu", "one attention layer with its projections (dim 512, 8 x 64, block 128), bf16 autocast: "
          "forward+backward and forward-only time and peak memory against N, forward-only up to 1M", "cuda",
          attention_cases([1024, 4096, 16384, 65536, 131072], [1024, 4096], ["layer"], fwd_only=(262144, 1048576)),
          headline=attention_headline, **ATTENTION),
    Study("kernels", "the attention core forward+backward at the kernels' shapes (block 128, bf16): time, peak memory, "
          "host time of an eager call, and on a GPU the window kernels' rate per computed score, the glue kernels' "
          "time and the launches of the forward and of the backward; grouped-query and head dims 32-256 included",
          "any", kernel_cases, measure_kernels, series="impl", baselines=("ours", "SDPA"),
          index=[("shape", "shape", ""), ("causal", "causal", "")],
          values=[("ms", "fwd+bwd ms", ",.2f"), ("fwd_ms", "fwd ms", ",.2f"), ("peak_mib", "MiB", ",.0f"),
                  ("host_ms", "host ms", ",.2f"), ("tflops", "TFLOP/s", ",.1f"), ("vs_sdpa", "vs SDPA", ".2f"),
                  ("fwd_tflops", "window fwd TFLOP/s", ",.0f"), ("bwd_tflops", "window bwd TFLOP/s", ",.0f"),
                  ("glue_ms", "glue ms", ",.2f"), ("glue_mb", "glue MB moved", ",.0f"), ("glue_gbps", "glue GB/s", ",.0f"),
                  ("glue_pct_bw", "glue % of card bandwidth", ",.0f"), ("launches_fwd", "launches fwd", ""),
                  ("launches_bwd", "launches bwd", "")],
          headline=kernels_headline, finish=kernels_finish, plot=("shape", "vs_sdpa", [], "causal"),
          points=lambda rows: [r for r in rows if r.get("impl") == "ours"],
          sdpa=lambda opts: (1, 8, 1024 if opts.quick else 16384, 64, True)),
    Study("kernel_resources", "the Triton kernels compiled for an H100 (sm_90a) on any machine, no GPU needed: "
          "registers per thread, spilled bytes and shared memory of each window kernel and tile (level 0 and coarse, "
          "head dims 64 and 128, block 128, causal) and of the glue kernels", "cpu", resource_cases, measure_resources,
          index=[("label", "kernel, level, head dim, tile", "")],
          values=[("warps", "warps", ""), ("registers", "registers", ""), ("spill_bytes", "spilled bytes", ""),
                  ("loop_spills", "spill instructions in loops", ""), ("shared_kib", "shared KiB", ",.1f"),
                  ("note", "note", "")],
          headline=resources_headline, plot=("registers", "spill_bytes", ["d"], "kernel"),
          points=lambda rows: [r for r in rows if r.get("registers") is not None]),
    Study("host", "host overhead of one attention layer with its projections (dim 512, 8 x 64, block 128), eager "
          "forward+backward at training shapes: wall time per step issued back to back, the host's time to issue a "
          "step, and on a GPU the kernels' busy time and wall / busy (1: the GPU never waits for the host)", "any",
          host_cases, measure_host, series="impl", baselines=("ours", "SDPA"),
          index=[("shape", "N x batch", ""), ("causal", "causal", "")],
          values=[("wall_ms", "wall ms", ",.2f"), ("host_ms", "host ms", ",.2f"), ("busy_ms", "GPU busy ms", ",.2f"),
                  ("wall_vs_busy", "wall / busy", ".2f")],
          headline=host_headline, plot=("shape", "host_ms", [], "impl")),
    Study("length_ratios", "time(4097) / time(4096) and time(32768) / time(8192) of the attention core's "
          "forward+backward on the CPU (1, 8, N, 64, float32, block 128), both lengths alternating in one process",
          "cpu", length_ratio_cases, measure_length_ratio, baselines=("ours", "SDPA"),
          index=[("impl", "impl", ""), ("pair", "pair", ""), ("causal", "causal", "")],
          values=[("ms_a", "ms shorter", ",.1f"), ("ms_b", "ms longer", ",.1f"), ("ratio_of_minimums",
                  "ratio of minimums", ".3f"), ("median_round_ratio", "median of round ratios", ".3f"),
                  ("target", "target", ""), ("meets_target", "met", "")],
          headline=length_ratio_headline, plot=("n_b", "median_round_ratio", ["causal"], "impl")),
    Study("decode_cpu", "per-token decoding latency against context length, causal HTransformer1D(dim 256, depth 4, "
          "4 x 64, block 128), float32, batch 1, greedy: the hierarchical cache (decode_step), this package "
          "recomputing the context per token, and 0.1.9's generate", "cpu",
          decode_cases([1024, 2048, 4096, 8192, 16384, 32768, 65536], [256, 512], ["cached", "uncached", "0.1.9"]),
          **DECODE),
    Study("decode_cuda", "decode_cpu's measurement on a GPU: cached = StaticDecoder (a CUDA graph per token), eager = "
          "decode_step, beside uncached and 0.1.9", "cuda",
          decode_cases([1024, 8192, 65536], [256, 512], ["cached", "eager", "uncached", "0.1.9"]), **DECODE),
    Study("cuda_graphs", "training steps of the base model (12 x 512, context 4,096, batch 8, bf16) eager, "
          "torch.compile and torch.compile(mode='reduce-overhead') (CUDA graphs), dense vs hierarchical", "cuda",
          cuda_graph_cases, measure_train_step, finish=cuda_graphs_finish, headline=cuda_graphs_headline,
          index=[("config", "attention", ""), ("mode", "mode", "")],
          values=[("ms_per_step", "ms/step", ",.1f"), ("tokens_per_s", "tokens/s", ",.0f"), ("vs_dense",
                  "vs dense, same mode", "x"), ("vs_dense_eager", "vs dense eager", "x"), ("loss", "loss", ".4f")],
          plot=("mode", "tokens_per_s", [], "config"), points=lambda rows: [  # modes in order along x
              {**r, "mode": ["eager", "default", "reduce-overhead"].index(r["mode"])} for r in rows],
          sdpa=lambda opts: (8, 8, 4096, 64, True)),
    Study("train_speed", "training tokens/s of the whole model (the CLI's bench: base preset, 32,768 tokens per step), "
          "hierarchical (block 512) vs dense, eager and --compile, at contexts 4,096 and 16,384", "any",
          bench_cases, measure_bench, training=True, headline=train_speed_headline,
          finish=lambda rows: vs_dense(rows, "tokens_per_s", ("context", "mode")),
          index=[("context", "context", ","), ("mode", "mode", ""), ("config", "attention", "")],
          values=[("batch_size", "batch", ""), ("ms_per_step", "ms/step", ",.1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                  ("vs_dense", "vs dense", "x"), ("peak_mib", "peak MiB", ",.0f")],
          plot=("context", "tokens_per_s", ["mode"], "config"),
          sdpa=lambda opts: (2, 2, 256, 32, True) if opts.quick else (2, 8, 16384, 64, True)),
    Study("pack", "training tokens/s with documents packed (train --pack: cu_seqlens, attention in padded buckets "
          "of similar length) vs the same documents in padded batches (each padded to the longest of its step); "
          "default corpus, base model (12 x 512, 8 x 64, block 128), context 4,096, batch 8, bf16 on a GPU", "any",
          pack_cases, measure_pack, finish=pack_finish, headline=pack_headline, baselines=("padded",),
          index=[("batching", "batching", "")],
          values=[("ms_per_step", "ms/step", ",.1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                  ("vs_padded", "vs padded", "x"), ("pieces_per_step", "documents per step", ",.1f"),
                  ("padding_pct", "padding %", ",.1f"), ("peak_mib", "peak MiB", ",.0f")],
          plot=("batching", "tokens_per_s", [], None),
          points=lambda rows: [{**r, "batching": ["padded", "packed"].index(r["batching"])} for r in rows]),
    Study("quality", "the same training run with hierarchical and with dense attention (base model, block 512, "
          "context 4,096, batch 8, 600 steps, lr 1e-3): validation bits per byte at equal tokens and training "
          "tokens/s; target: within 3% of dense at 1.5x its speed", "any", quality_cases, measure_quality,
          training=True, finish=quality_finish, headline=quality_headline,
          index=[("label", "attention", "")],
          values=[("status", "status", ""), ("steps", "steps", ""), ("at_step", "compared at step", ""),
                  ("bpb_at", "val bpb there", ".4f"), ("full_val_bpb", "whole val split bpb", ".4f"),
                  ("tokens_per_s", "tokens/s", ",.0f"), ("bpb_vs_dense_pct", "bpb vs dense %", "+.2f"),
                  ("speed_vs_dense", "speed vs dense", "x"), ("target_met", "target met", "")],
          plot=("step", "val_bpb", [], "label"), points=lambda rows: [{"step": s, "val_bpb": v, "label": r["label"]}
                                                             for r in rows for s, v, _ in r.get("evals", [])],
          sdpa=lambda opts: (4, 2, 128, 32, True) if opts.quick else (8, 8, 4096, 64, True)),
    Study("scaling", "data-parallel training tokens/s of the CLI on K = 1, 2, 4 GPUs (DDP through torch.distributed."
          "run, base preset, 8 sequences per GPU) and the scaling efficiency tokens/s(K) / (K x tokens/s(1)), "
          "tokens/s(1) being the better of two 1-GPU runs (the first and the last case)", "any",
          scaling_cases, measure_scaling, training=True, finish=scaling_finish, baselines=("ours on 1 GPU",),
          headline=scaling_headline, index=[("k", "K", ""), ("run", "run", ""), ("global_batch", "global batch", "")],
          values=[("status", "status", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("tokens_per_s_per_gpu",
                  "tokens/s per GPU", ",.0f"), ("step_ms", "median step ms", ",.1f"), ("speedup", "speedup", "x"),
                  ("efficiency", "efficiency", "%"), ("note", "note", "")],
          plot=("k", "tokens_per_s", [], None)),
    Study("lra_listops", "Long Range Arena ListOps: `lra listops train` variants (the recipe's defaults plus flags), "
          "hierarchical vs dense; test accuracy of the final model, validation accuracy, time, memory", "any",
          lambda opts: [{"label": v} for v in (["hier", "dense"] if opts.quick and not opts.cases else LRA_VARIANTS)],
          measure_lra,
          training=True, setup=lra_setup, baselines=("ours", "SDPA"),
          headline=lambda rows: "; ".join(f"{r['label']}: test {r['test_accuracy']:.2%}" for r in rows
                                          if r.get("test_accuracy") is not None and r["label"] in ("hier", "dense")),
          index=[("label", "run", ""), ("flags", "flags", "")],
          values=[("test_accuracy", "test acc", "%"), ("best_test_accuracy", "test acc at best val", "%"),
                  ("final_val_accuracy", "final val acc", "%"),
                  ("best_val_accuracy", "best val acc", "%"), ("best_val_step", "best step", ""),
                  ("train_min", "train min", ".1f"), ("examples_per_s", "examples/s", ",.1f"),
                  ("peak_gib", "peak GiB", ".2f"), ("note", "note", "")],
          plot=("step", "val_acc", [], "label"), points=lambda rows: [{"step": s, "val_acc": v, "label": r["label"]}
                                                             for r in rows for s, v in r.get("val_curve", [])]),
]}  # fmt: skip
