"""Per-token decoding latency against context length: the hierarchical cache, recomputing, and 0.1.9.

Model (all three paths): causal HTransformer1D(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64,
block_size=128), float32, batch 1, max_seq_len = the largest context. For a context of L tokens:

- cached: this package's `prefill` of the L-token prompt (timed on its own), then one token at a time
  the way `generate` does it, each step timed (greedy, the argmax fed back), after a few untimed
  steps: on the CPU `decode_step` (the eager cache), on CUDA `StaticDecoder` replaying a CUDA graph,
  each attention layer's step two Triton launches (`--step` picks another);
- eager, pytorch, compiled (CUDA, for comparison): the cached path with `decode_step`, with
  `StaticDecoder(kernel=False)` (the attention step in PyTorch operations, in a CUDA graph), and
  with `StaticDecoder(compile=True)` (torch.compile'd step with the Triton attention step, in a CUDA
  graph; compiled before the timing);
- uncached: this package's `AutoregressiveWrapper.generate(prompt, k, use_cache=False)`, which runs the
  full forward over the context for every token: per token = total / k;
- 0.1.9: the h-transformer-1d 0.1.9 package's `AutoregressiveWrapper.generate(prompt, k)` (it also
  recomputes everything per token, padding to the next power of two): per token = total / k.

A recomputing measurement is warmed up first with one untimed token: on CUDA at the measured context
itself (kernel selection, allocator growth and lazy initialisation at that shape stay out of the
timing), on the CPU at 512 tokens (there a token at long context takes seconds, and first-call costs
are small beside it). k is at most `--recompute-tokens` (default 16 on CUDA, 4 on the CPU). On CUDA
each recomputing measurement is taken in `--repeats` (default 3) separate processes and the median
kept, the range shown beside it: 0.1.9's time at 8k moved between 14 and 30 ms from one process to
the next on the same kind of card (likely bound by Python and launches there), while the cached
paths' did not.

The recomputing paths are slow at long contexts: k is cut to fit `--budget` seconds per
measurement, from an estimate based on the previous context, and a context whose estimated time for
one token exceeds `--max-token-seconds` is skipped (marked in the table). Every measurement runs in
its own subprocess (this file with `--worker`): 0.1.9 has the same import name `h_transformer_1d` as
this package, so it runs with PYTHONPATH pointing at `benchmarks/.legacy` (installed there on first
use: `pip install --no-deps --target benchmarks/.legacy h-transformer-1d==0.1.9 einops
rotary-embedding-torch`).

Run from the repository root:

    python benchmarks/decode.py                   # CPU, contexts 1k..64k -> benchmarks/results/decode_cpu.*
    python benchmarks/decode.py --device cuda     # -> benchmarks/results/decode_cuda.* (also eager, compiled)
    python benchmarks/decode.py --quick           # smoke run: 1k and 2k, few tokens

Contention: the worker records which share of all CPUs other processes used during the timed part;
above 15% the number is marked with a dagger in the table (small-op code such as one decode step
suffers most from a busy machine). `--wait-idle` seconds are spent at most, per measurement, waiting
for the machine to be quiet first; a disturbed measurement is repeated (`--retries`) and the least
disturbed kept; `--retry-contended` re-measures only the marked entries of the last result file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
LEGACY_DIR = BENCH_DIR / ".legacy"
LEGACY_PACKAGES = ["h-transformer-1d==0.1.9", "einops", "rotary-embedding-torch"]
RESULTS_DIR = BENCH_DIR / "results"

MODEL = {"num_tokens": 256, "dim": 256, "depth": 4, "heads": 4, "dim_head": 64, "block_size": 128}
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
IMPLS = ["cached", "uncached", "legacy"]
STEP_IMPLS = ["eager", "pytorch", "compiled"]  # other cached step paths, for comparison on CUDA
CACHED = ["cached", *STEP_IMPLS]
GRAPH_STEPS = ("graph", "pytorch", "compiled")  # cached step kinds that replay a CUDA graph
LABEL = {
    "cached": "cached (this package)",
    "uncached": "uncached (this package)",
    "legacy": "0.1.9 generate",
    "eager": "cached, eager steps",
    "pytorch": "cached, PyTorch step",
    "compiled": "cached, compiled step",
}
STEP_LABEL = {
    "eager": "eager steps (`decode_step`)",
    "graph": "one CUDA graph replay per step, Triton attention steps (`StaticDecoder`, what `generate` uses on CUDA)",
    "pytorch": "one CUDA graph replay per step, attention steps in PyTorch operations (`StaticDecoder(kernel=False)`)",
    "static": "fixed-shape steps without a graph (`StaticDecoder(graph=False)`)",
    "compiled": "one CUDA graph replay per step of the torch.compile'd step (`StaticDecoder(compile=True)`)",
}
RESULT_TAG = "DECODE_RESULT_JSON:"
WARM_CONTEXT = 512  # a short run of the same code first: allocator, kernels, lazy initialisation
CONTENDED = 0.15  # other processes' CPU share above which a number is marked


# ---------------------------------------------------------------- CPU accounting (Linux /proc)


def cpu_busy_seconds() -> float | None:
    """Busy time of all CPUs together since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """Share of all CPUs that other processes used between start() and stop()."""

    def start(self):
        self.busy, self.own, self.wall = cpu_busy_seconds(), time.process_time(), time.perf_counter()

    def stop(self) -> float | None:
        busy, own, wall = cpu_busy_seconds(), time.process_time(), time.perf_counter()
        if busy is None or self.busy is None or wall <= self.wall:
            return None
        others = (busy - self.busy) - (own - self.own)
        return max(0.0, others / ((wall - self.wall) * (os.cpu_count() or 1)))


def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Sleep until other processes use under `threshold` of the CPUs (1 s samples); seconds waited."""
    waited = 0.0
    while waited < max_wait:
        meter = ContentionMeter()
        meter.start()
        time.sleep(1.0)
        share = meter.stop()
        if share is None or share < threshold:
            break
        waited += 1.0
    return waited


# ---------------------------------------------------------------- the worker (one measurement)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(impl: str, max_context: int, device):
    import torch

    import h_transformer_1d

    expected = LEGACY_DIR if impl == "legacy" else REPO_ROOT
    if not Path(h_transformer_1d.__file__).resolve().is_relative_to(expected.resolve()):
        raise RuntimeError(f"{impl} imported h_transformer_1d from {h_transformer_1d.__file__}, expected {expected}")
    torch.manual_seed(0)
    if impl == "legacy":
        from h_transformer_1d.autoregressive_wrapper import AutoregressiveWrapper

        from h_transformer_1d import HTransformer1D
    else:
        from h_transformer_1d import AutoregressiveWrapper, HTransformer1D
    model = HTransformer1D(**MODEL, max_seq_len=max_context, causal=True).to(device).eval()
    return AutoregressiveWrapper(model)


def measure_cached(wrapper, prompt, tokens: int, warm_steps: int, device, step_kind: str) -> dict:
    """`step_kind` "eager": `decode_step` (HierarchicalCache, Python per level); "graph": `StaticDecoder`
    replaying a CUDA graph per token (what `generate` uses on CUDA); "static": StaticDecoder, no graph;
    "pytorch": StaticDecoder(kernel=False) in a CUDA graph; "compiled": StaticDecoder(compile=True) in a
    CUDA graph (compiles at its first step, untimed)."""
    import torch

    from h_transformer_1d.model.cache import StaticDecoder, decode_step, prefill

    meter = ContentionMeter()

    def run(prompt_tokens, steps, times=None):
        _sync(device)
        start = time.perf_counter()
        logits, cache = prefill(wrapper.net, prompt_tokens)
        _sync(device)
        prefill_seconds = time.perf_counter() - start
        decoder = None  # made after the prefill's timing; the graph is captured in the first, untimed step
        if step_kind != "eager":
            capacity = prompt_tokens.shape[1] + steps + 1
            graph = step_kind in GRAPH_STEPS
            kernel = False if step_kind == "pytorch" else None
            compile = step_kind == "compiled"
            decoder = StaticDecoder(wrapper.net, cache, capacity, graph=graph, compile=compile, kernel=kernel)
        nxt = logits[:, -1].argmax(-1)
        for step in range(steps):
            if step == warm_steps:
                meter.start()
            start = time.perf_counter()
            if decoder is None:
                nxt = decode_step(wrapper.net, cache, nxt).argmax(-1)
            else:
                nxt = decoder.step(nxt).argmax(-1)
            _sync(device)
            if times is not None and step >= warm_steps:
                times.append(time.perf_counter() - start)
        return prefill_seconds, cache if decoder is None else decoder

    with torch.no_grad():
        run(prompt[:, :WARM_CONTEXT], warm_steps + 4)
        times: list[float] = []
        prefill_seconds, state = run(prompt, warm_steps + tokens, times)
    stored = sum(t.numel() * t.element_size() for t in state.stored_tensors())
    ms = sorted(t * 1e3 for t in times)
    return {
        "other_cpu_share": meter.stop(),
        "ms_per_token": statistics.fmean(ms),
        "median_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "max_ms": ms[-1],
        "tokens": len(ms),
        "prefill_s": prefill_seconds,
        "cache_bytes": stored,
        "positions_after": state.length,
        "step": step_kind,
    }


def measure_recompute(impl: str, wrapper, prompt, tokens: int, device) -> dict:
    import torch

    kwargs = {"use_cache": False, "temperature": 0.0} if impl == "uncached" else {}
    with torch.no_grad():
        wrapper.generate(prompt if device.type == "cuda" else prompt[:, :WARM_CONTEXT], 1, **kwargs)
        _sync(device)
        meter = ContentionMeter()
        meter.start()
        start = time.perf_counter()
        wrapper.generate(prompt, tokens, **kwargs)
        _sync(device)
        total = time.perf_counter() - start
    return {"ms_per_token": total * 1e3 / tokens, "tokens": tokens, "total_s": total, "other_cpu_share": meter.stop()}


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    wrapper = _build(spec["impl"], spec["max_context"], device)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, MODEL["num_tokens"], (1, spec["context"]), generator=generator).to(device)
    if spec["impl"] in CACHED:
        result = measure_cached(wrapper, prompt, spec["tokens"], spec["warm_steps"], device, spec["step"])
    else:
        result = measure_recompute(spec["impl"], wrapper, prompt, spec["tokens"], device)
    if device.type == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


# ---------------------------------------------------------------- the runner


def ensure_legacy() -> str | None:
    """Install 0.1.9 into benchmarks/.legacy if absent; an error message, or None when it is there."""
    if (LEGACY_DIR / "h_transformer_1d").is_dir():
        return None
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(LEGACY_DIR)]
    proc = subprocess.run(cmd + LEGACY_PACKAGES, check=False, capture_output=True, text=True)
    if proc.returncode:
        return (proc.stderr or proc.stdout).strip().splitlines()[-1]
    return None


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(LEGACY_DIR if spec["impl"] == "legacy" else REPO_ROOT)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    return {"error": tail[-1] if tail else f"worker exited with code {proc.returncode}"}


def environment(device: str, threads: int) -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], check=False, capture_output=True, text=True
            ).stdout
        except OSError:  # no git on this machine
            return ""

    sha = git("rev-parse", "--short", "HEAD").strip()
    dirty = git("status", "--porcelain", "--", "h_transformer_1d").strip()
    env = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),  # what the workers use
        "device": device,
        "git": sha + (" + uncommitted changes" if dirty else "") if sha else "unknown",
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def dense_kv_bytes(positions: int) -> int:
    """What a dense KV cache of float32 keys and values would hold for the same model."""
    return positions * MODEL["depth"] * 2 * MODEL["heads"] * MODEL["dim_head"] * 4


def disturbance(result: dict) -> float:
    """Other processes' CPU share during a measurement (infinite for a failed one, 0 for a skipped one)."""
    if "error" in result:
        return math.inf
    return result.get("other_cpu_share") or 0.0


def median_of(runs: list[dict]) -> dict:
    """Repeated measurements of one recomputing path: the one with the median time (the faster middle
    one of an even number), with every time (ms per token, sorted) under "repeats_ms", the number of
    failed runs under "repeats_failed" and the largest other-process CPU share of any run (so a
    disturbed repeat marks the entry); all failed: the first failure."""
    done = sorted((r for r in runs if "ms_per_token" in r), key=lambda r: r["ms_per_token"])
    if not done:
        return runs[0]
    median = dict(done[(len(done) - 1) // 2])
    median["repeats_ms"] = [r["ms_per_token"] for r in done]
    median["repeats_failed"] = len(runs) - len(done)
    shares = [r["other_cpu_share"] for r in done if r.get("other_cpu_share") is not None]
    median["other_cpu_share"] = max(shares) if shares else None
    return median


def fmt_ms(result: dict | None, key: str = "ms_per_token") -> str:
    if result is None:
        return "-"
    if "skipped" in result:
        return f"skipped ({result['skipped']})"
    if "error" in result:
        return f"error: {result['error'][:60]}"
    value = result[key]
    text = f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    share = result.get("other_cpu_share")
    spread = result.get("repeats_ms", [])
    failed = result.get("repeats_failed", 0)
    if key == "ms_per_token" and (len(spread) > 1 or failed):
        text += f" ({spread[0]:,.1f}-{spread[-1]:,.1f}" + (f"; {failed} failed" if failed else "") + ")"
    return text + (" †" if share is not None and share > CONTENDED else "")


def ratios(results: dict, contexts: list[int]) -> dict:
    def ms(impl, context):
        r = results.get(impl, {}).get(str(context))
        return r["ms_per_token"] if r and "ms_per_token" in r else None

    out = {}
    lo, hi = min(contexts), max(contexts)
    if ms("cached", lo) and ms("cached", hi):
        out["cached_longest_over_shortest"] = ms("cached", hi) / ms("cached", lo)
    for impl in ("uncached", "legacy"):
        out[f"speedup_over_{impl}"] = {
            str(c): ms(impl, c) / ms("cached", c) for c in contexts if ms(impl, c) and ms("cached", c)
        }
    for step in STEP_IMPLS:  # the other step paths, where measured
        if ms(step, lo) and ms(step, hi):
            out[f"{step}_longest_over_shortest"] = ms(step, hi) / ms(step, lo)
        out[f"{step}_speedup_over_legacy"] = {
            str(c): ms("legacy", c) / ms(step, c) for c in contexts if ms("legacy", c) and ms(step, c)
        }
    return out


def write_markdown(path: Path, config: dict, env: dict, results: dict, key: dict) -> None:
    contexts = config["contexts"]
    lo, hi = min(contexts), max(contexts)
    lines = [
        f"# Decoding latency against context length ({env['device']})",
        "",
        "Generated by `benchmarks/decode.py`"
        + (" --device cuda" if env["device"] == "cuda" else "")
        + "; see its docstring for what is measured.",
        "",
        (
            f"- model: causal HTransformer1D({', '.join(f'{k}={v}' for k, v in MODEL.items())}), float32, batch 1,"
            f" max_seq_len={max(contexts)}, greedy"
        ),
        f"- torch {env['torch']}, Python {env['python']}, {env['cpu']} ({env['cpu_count']} CPUs,"
        f" torch threads: {env['torch_threads']})"
        + (f", GPU {env['gpu']} (CUDA {env['cuda']})" if "gpu" in env else ""),
        f"- {env['date']}, git {env['git']}"
        + (f"; disturbed entries re-measured {env['retried_contended']}" if "retried_contended" in env else ""),
        (
            f"- cached: {config['tokens']} timed decode steps per context after {config['warm_steps']} untimed ones,"
            f" {STEP_LABEL[config.get('step', 'eager')]}"
            + "".join(f"; {LABEL[step]}: {STEP_LABEL[step]}" for step in STEP_IMPLS if results.get(step))
            + ";"
            f" recomputing paths: k tokens per generate call (column k), budget {config['budget']:.0f} s each"
            + (f", after {config['recompute_warmup']} (untimed)" if "recompute_warmup" in config else "")
            + (
                f"; each measured in {config['recompute_repeats']} processes: the median (fastest-slowest)"
                if config.get("recompute_repeats", 1) > 1
                else ""
            )
        ),
        "",
        "## Key numbers",
        "",
    ]
    if "cached_longest_over_shortest" in key:
        r = key["cached_longest_over_shortest"]
        lines.append(
            f"- cached per-token time at {hi:,} over {lo:,} tokens of context: **{r:.2f}x**"
            f" (target <= 1.5: {'met' if r <= 1.5 else 'NOT met'})"
        )
    for impl, target in (("legacy", 100), ("uncached", None)):
        for c, s in key[f"speedup_over_{impl}"].items():
            if int(c) == 8192 or (impl == "uncached" and int(c) in (lo, hi)):
                verdict = f" (target >= {target}: {'met' if s >= target else 'NOT met'})" if target else ""
                lines.append(f"- cached vs {LABEL[impl]} at {int(c):,} context: **{s:,.0f}x** faster{verdict}")
    for step in STEP_IMPLS:
        if f"{step}_longest_over_shortest" in key:
            r = key[f"{step}_longest_over_shortest"]
            lines.append(f"- {LABEL[step]}: per-token time at {hi:,} over {lo:,} tokens of context: **{r:.2f}x**")
        for c, s in key.get(f"{step}_speedup_over_legacy", {}).items():
            if int(c) == 8192:
                lines.append(
                    f"- {LABEL[step]} vs 0.1.9 generate at 8,192 context: **{s:,.0f}x** faster"
                    f" (target >= 100: {'met' if s >= 100 else 'NOT met'})"
                )
    steps = [step for step in STEP_IMPLS if results.get(step)]
    lines += [
        "",
        "## Per-token time (ms)",
        "",
        (
            "| context | cached mean | cached median | cached max | cached tok/s | prefill s | cache MiB |"
            " dense KV MiB | uncached | k | 0.1.9 | k | vs uncached | vs 0.1.9 |"
            + "".join(f" {LABEL[step]} | {step} vs 0.1.9 |" for step in steps)
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(steps),
    ]
    for c in contexts:
        cached = results["cached"].get(str(c))
        uncached = results["uncached"].get(str(c))
        legacy = results["legacy"].get(str(c))
        ok = cached is not None and "ms_per_token" in cached
        row = [
            f"{c:,}",
            fmt_ms(cached),
            fmt_ms(cached, "median_ms") if ok else "-",
            fmt_ms(cached, "max_ms") if ok else "-",
            f"{1e3 / cached['ms_per_token']:,.0f}" if ok else "-",
            f"{cached['prefill_s']:.2f}" if ok else "-",
            f"{cached['cache_bytes'] / 2**20:.1f}" if ok else "-",
            f"{dense_kv_bytes(cached['positions_after']) / 2**20:.1f}" if ok else "-",
            fmt_ms(uncached),
            str(uncached.get("tokens", "-")) if uncached else "-",
            fmt_ms(legacy),
            str(legacy.get("tokens", "-")) if legacy else "-",
        ]
        for impl in ("uncached", "legacy"):
            s = key[f"speedup_over_{impl}"].get(str(c))
            row.append(f"{s:,.0f}x" if s else "-")
        for step in steps:
            s = key.get(f"{step}_speedup_over_legacy", {}).get(str(c))
            row += [fmt_ms(results[step].get(str(c))), f"{s:,.0f}x" if s else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        (
            "cache MiB: every tensor the hierarchical cache holds (all layers) after the timed steps; dense KV MiB:"
            " what float32 keys and values of every position would take."
        ),
        f"† other processes used more than {CONTENDED:.0%} of the CPUs during that measurement.",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(path: Path, config: dict, env: dict, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = config["contexts"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    styles = (
        ("cached", "o-"),
        ("eager", "v--"),
        ("pytorch", "P--"),
        ("compiled", "D--"),
        ("uncached", "s-"),
        ("legacy", "^-"),
    )
    for impl, style in styles:
        points = [(c, r) for c in contexts if (r := results.get(impl, {}).get(str(c))) and "ms_per_token" in r]
        if not points:
            continue
        xs = [c for c, _ in points]
        axes[0].plot(xs, [r["ms_per_token"] for _, r in points], style, label=LABEL[impl])
        axes[1].plot(xs, [1e3 / r["ms_per_token"] for _, r in points], style, label=LABEL[impl])
        if impl == "cached":
            axes[0].plot(xs, [r["median_ms"] for _, r in points], "o:", color="C0", alpha=0.6, label="cached (median)")
            axes[2].plot(xs, [r["cache_bytes"] / 2**20 for _, r in points], style, label="hierarchical cache")
            axes[2].plot(
                xs, [dense_kv_bytes(r["positions_after"]) / 2**20 for _, r in points], "k--", label="dense KV cache"
            )
    titles = ("per-token time (ms)", "tokens / s", "decoding state (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    device = env["device"] + (
        f" ({env['gpu']})" if "gpu" in env else f" ({env['cpu']}, torch threads: {env['torch_threads']})"
    )
    fig.suptitle(f"H-Transformer-1D decoding, 4 layers x 256, block 128, batch 1 - {device}, torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS + STEP_IMPLS,
        help="default: cached, uncached, legacy; on cuda also eager (decode_step), pytorch (StaticDecoder(kernel=False))"
        " and compiled (StaticDecoder(compile=True))",
    )
    parser.add_argument("--tokens", type=int, default=256, help="timed decode steps per context (cached)")
    parser.add_argument("--warm-steps", type=int, default=8, help="untimed decode steps after the prefill")
    parser.add_argument(
        "--recompute-tokens", type=int, help="at most k tokens per recomputing run (default: 16 on cuda, 4 on cpu)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="measurements of each recomputing path per context, each in a new process; the median is kept"
        " and the range shown (default: 3 on cuda, where 0.1.9's time moved 2x between processes, 1 on cpu)",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per recomputing measurement")
    parser.add_argument("--max-token-seconds", type=float, default=60.0, help="skip when one token takes longer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch default)")
    parser.add_argument("--wait-idle", type=float, default=120.0, help="wait this long at most for a quiet machine")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="contexts 1k and 2k, few tokens")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a measurement that was disturbed")
    parser.add_argument(
        "--retry-contended", action="store_true", help="re-measure only the marked entries of the last results"
    )
    parser.add_argument(
        "--step",
        default="auto",
        choices=["auto", "eager", "graph", "static", "pytorch", "compiled"],
        help="cached path: eager decode_step, StaticDecoder as a CUDA graph, or StaticDecoder without one"
        " (auto: what generate uses, graph on cuda and eager on cpu)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.device == "cpu" and (args.step in GRAPH_STEPS or set(GRAPH_STEPS) & set(args.impls or [])):
        parser.error(
            "--step graph / pytorch / compiled and --impls pytorch / compiled need --device cuda (CUDA graphs)"
        )
    if args.impls is None:
        args.impls = IMPLS + (STEP_IMPLS if args.device == "cuda" else [])
    if args.repeats is None:
        args.repeats = 3 if args.device == "cuda" else 1
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.recompute_tokens is None:
        args.recompute_tokens = 16 if args.device == "cuda" else 4
    if args.quick:
        args.contexts, args.tokens, args.recompute_tokens = [1024, 2048], 32, 1

    from tqdm import tqdm

    contexts = sorted(args.contexts)
    config = {
        "contexts": contexts,
        "tokens": args.tokens,
        "warm_steps": args.warm_steps,
        "recompute_tokens": args.recompute_tokens,
        "recompute_repeats": args.repeats,
        "recompute_warmup": "one token at the context" if args.device == "cuda" else f"one token at {WARM_CONTEXT}",
        "budget": args.budget,
        "max_token_seconds": args.max_token_seconds,
        "threads": args.threads,
        "step": args.step if args.step != "auto" else ("graph" if args.device == "cuda" else "eager"),
    }
    stem = args.out_dir / (f"decode_{args.device}" + ("_quick" if args.quick else ""))
    timeout = 600 + 3 * args.budget + 4 * args.max_token_seconds

    def spec_for(impl: str, context: int, tokens: int) -> dict:
        return {
            "impl": impl,
            "context": context,
            "max_context": max(config["contexts"]),
            "device": args.device,
            "threads": config["threads"],
            "warm_steps": config["warm_steps"],
            "tokens": tokens,
            "step": impl if impl in STEP_IMPLS else config.get("step", "eager"),
        }

    def measure(spec: dict) -> dict:
        """Run one measurement; while other processes got in its way, again (--retries), keeping the least
        disturbed result. A recomputing run that takes more than half its budget is not repeated."""
        best = None
        for _ in range(1 + args.retries):
            waited = wait_until_quiet(args.wait_idle) if args.device == "cpu" else 0.0
            result = run_worker(spec, timeout)
            result["waited_for_quiet_s"] = waited
            if best is None or disturbance(result) < disturbance(best):
                best = result
            if disturbance(best) <= CONTENDED or result.get("total_s", 0.0) > config["budget"] / 2:
                break
        return best

    def measure_repeated(spec: dict, repeats: int) -> dict:
        """A recomputing path measured `repeats` times, each in its own process (their times differ
        between processes): the median (`median_of`); a cached path, or one repeat: `measure` once."""
        if spec["impl"] in CACHED or repeats <= 1:
            return measure(spec)
        return median_of([measure(spec) for _ in range(repeats)])

    if args.retry_contended:  # re-measure only what the last run marked, keeping its settings
        previous = json.loads(stem.with_suffix(".json").read_text())
        config, results, env = previous["config"], previous["results"], previous["environment"]
        contexts = config["contexts"]
        todo = [(impl, int(c), r) for impl, rs in results.items() for c, r in rs.items() if disturbance(r) > CONTENDED]
        for impl, context, old in tqdm(todo, desc="re-measuring contended"):
            tokens = config["tokens"] if impl in CACHED else old.get("tokens", 1)
            result = measure_repeated(spec_for(impl, context, tokens), config.get("recompute_repeats", 1))
            if disturbance(result) < disturbance(old):
                results[impl][str(context)] = result
            tqdm.write(f"{impl:>9} {context:>6}: {fmt_ms(results[impl][str(context)])} ms/token")
        env["retried_contended"] = datetime.datetime.now().isoformat(timespec="seconds")
    else:
        results: dict[str, dict[str, dict]] = {impl: {} for impl in IMPLS + [i for i in args.impls if i not in IMPLS]}
        if "legacy" in args.impls and (error := ensure_legacy()):
            results["legacy"] = {str(c): {"error": f"0.1.9 not installed: {error}"} for c in contexts}
            args.impls = [i for i in args.impls if i != "legacy"]
        env = environment(args.device, args.threads)
        progress = tqdm([(impl, c) for impl in args.impls for c in contexts], desc="decode benchmark")
        for impl, context in progress:
            progress.set_postfix_str(f"{impl} {context}")
            tokens = args.tokens
            if impl not in CACHED:
                # per token grows a bit faster than linearly with the context; extrapolate from the last one
                done = [(c, r) for c, r in results[impl].items() if "ms_per_token" in r]
                last_ms, last_context = (done[-1][1]["ms_per_token"], int(done[-1][0])) if done else (0.0, context)
                estimate = last_ms / 1e3 * 2.2 ** math.log2(context / last_context)
                if estimate > args.max_token_seconds or any("skipped" in r for r in results[impl].values()):
                    results[impl][str(context)] = {"skipped": f"est. {estimate:.0f} s/token"}
                    continue
                fit = int(args.budget / estimate) if estimate else args.recompute_tokens
                tokens = max(1, min(args.recompute_tokens, fit))
            results[impl][str(context)] = measure_repeated(spec_for(impl, context, tokens), args.repeats)
            tqdm.write(f"{impl:>9} {context:>6}: {fmt_ms(results[impl][str(context)])} ms/token")

    key = ratios(results, contexts)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "model": MODEL, "environment": env, "results": results, "key": key}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(stem.with_suffix(".md"), config, env, results, key)
    plot(stem.with_suffix(".png"), config, env, results)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
