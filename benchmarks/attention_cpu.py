"""CPU benchmark of hierarchical attention: this package vs dense SDPA vs h-transformer-1d 0.1.9.

Run from the repository root:

    python benchmarks/attention_cpu.py            # full run (about 20-25 minutes on 2 cores)
    python benchmarks/attention_cpu.py --quick    # smoke run (under a minute)

It writes benchmarks/results/attention_cpu.{md,json,png} (--quick: benchmarks/results/quick/). See
benchmarks/README.md.

Every measurement runs in its own worker subprocess (this file with ``--worker``), with PYTHONPATH
set so that the right package is importable: the old 0.1.9 package has the same import name
``h_transformer_1d`` as this one, so the two never meet in one process. A fresh process per
measurement also isolates the peak-memory reading.

What a measurement is: forward + backward (``out.backward(grad)`` with a fixed random grad) of
either the attention core on (B=1, H=8, N, D=64) float32 q/k/v that require grad, or one attention
layer with its projections (dim 512, 8 heads x 64) on x of shape (1, N, 512) that requires grad.

  * time: the first run at size N is a warm-up (and the memory run); then up to ``reps(N)`` timed
    runs, stopping early once the runs at this N have used ``--rep-budget`` seconds; the median
    of the timed runs is reported. If the first run alone takes more than ``--single-run-seconds``
    it is the only sample (marked ``*`` in the tables).
  * memory: the increase of the worker's peak resident set size (VmHWM in /proc/self/status)
    over its VmRSS just before the first run at size N. VmHWM is reset to the current RSS first by
    writing "5" to /proc/self/clear_refs; where that is not allowed, the peak since process start
    (same VmHWM) is used. Inputs, grad_out and parameters exist before the baseline, so the number
    is what forward + backward add: activations, saved tensors, gradients, workspaces.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_LEGACY_DIR = BENCH_DIR / ".legacy"
DEFAULT_OUT_DIR = BENCH_DIR / "results"
LEGACY_PACKAGES = ["h-transformer-1d==0.1.9", "einops", "rotary-embedding-torch"]

DEFAULT_SIZES = [1024, 2048, 4096, 4097, 8192, 16384, 32768]
QUICK_SIZES = [1024, 2048]
BLOCK_SIZE = 128
HEADS, DIM_HEAD, DIM = 8, 64, 512
WARM_N = 512  # a tiny first run of the same code (library init, JIT kernels) before the baseline
RESULT_TAG = "BENCH_RESULT_JSON:"

# (section, impl) pairs, in table order
CORE_IMPLS = ["ours", "sdpa"]
LAYER_IMPLS = ["ours", "sdpa", "legacy"]
IMPL_LABEL = {"ours": "ours", "sdpa": "SDPA", "legacy": "0.1.9"}
REV_DEPTHS = [1, 2, 4, 8]
REV_SEQ = 4096


# ---------------------------------------------------------------------------------------------
# process memory helpers (Linux /proc)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: resource gives only the peak; use it as the baseline
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far (all CPUs, from /proc/stat; steal counts as busy)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class RunTimer:
    """Wall time of one run, plus how much of the machine other processes used meanwhile."""

    def __enter__(self):
        self.busy0, self.cpu0 = cpu_busy_seconds(), time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.own_cpu = time.process_time() - self.cpu0
        busy1 = cpu_busy_seconds()
        if self.busy0 is None or busy1 is None or self.wall <= 0:
            self.other_share = None
        else:
            other = max(0.0, (busy1 - self.busy0) - self.own_cpu)
            self.other_share = min(1.0, other / (self.wall * (os.cpu_count() or 1)))
        return False


def machine_busy_cores(sample_s: float = 0.5) -> float | None:
    b0 = cpu_busy_seconds()
    time.sleep(sample_s)
    b1 = cpu_busy_seconds()
    return None if b0 is None or b1 is None else (b1 - b0) / sample_s


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


# ---------------------------------------------------------------------------------------------
# worker side: builds one workload and measures it


def _import_package(impl: str):
    """Import `h_transformer_1d` and check it is the one this impl expects."""
    import h_transformer_1d

    path = Path(h_transformer_1d.__file__).resolve()
    if impl == "legacy" and REPO_ROOT / "h_transformer_1d" in path.parents:
        raise RuntimeError(f"expected the 0.1.9 package, imported {path}")
    if impl == "ours" and REPO_ROOT / "h_transformer_1d" not in path.parents:
        raise RuntimeError(f"expected this repository's package, imported {path}")
    return h_transformer_1d


def _package_info(impl: str) -> dict:
    if impl not in ("ours", "legacy"):
        return {}
    import h_transformer_1d

    pkg_dir = Path(h_transformer_1d.__file__).resolve().parent
    digest = hashlib.sha1()
    for f in sorted(pkg_dir.rglob("*.py")):
        digest.update(str(f.relative_to(pkg_dir)).encode() + b"\0" + f.read_bytes())
    return {
        "package_file": str(pkg_dir / "__init__.py"),
        "package_version": getattr(h_transformer_1d, "__version__", "0.1.9" if impl == "legacy" else None),
        "package_sha1": digest.hexdigest()[:12],  # of the package's .py sources, to spot code changes between runs
    }


class PlainSDPALayer:
    """Built lazily (torch is imported only in workers): the same projections as HAttention1D
    (to_qkv without bias, to_out with bias), dense attention via F.scaled_dot_product_attention."""

    @staticmethod
    def make(dim: int, heads: int, dim_head: int, causal: bool):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class _Layer(nn.Module):
            def __init__(self):
                super().__init__()
                self.heads, self.dim_head, self.causal = heads, dim_head, causal
                self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
                self.to_out = nn.Linear(heads * dim_head, dim)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head)).permute(2, 0, 3, 1, 4)
                out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
                return self.to_out(out.transpose(1, 2).flatten(2))

        return _Layer()


def build_step(section: str, impl: str, n: int, causal: bool):
    """Return (step, tensors_to_clear): step() runs forward + backward once."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(n)
    if section == "core":
        q, k, v = (torch.randn(1, HEADS, n, DIM_HEAD, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(1, HEADS, n, DIM_HEAD, generator=gen)
        if impl == "ours":
            h_attention = _import_package("ours").h_attention

            def fn():
                return h_attention(q, k, v, block_size=BLOCK_SIZE, causal=causal)

        elif impl == "sdpa":

            def fn():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        else:
            raise ValueError(f"no core benchmark for impl {impl!r}")
        leaves = [q, k, v]
    elif section == "layer":
        torch.manual_seed(0)
        if impl == "ours":
            pkg = _import_package("ours")
            cls = pkg.CausalHAttention1D if causal else pkg.HAttention1D
            layer = cls(DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK_SIZE)
        elif impl == "sdpa":
            layer = PlainSDPALayer.make(DIM, HEADS, DIM_HEAD, causal)
        elif impl == "legacy":
            import importlib

            _import_package("legacy")
            mod = importlib.import_module("h_transformer_1d.h_transformer_1d")  # 0.1.9 exports only the model
            if causal:
                layer = mod.CausalHAttention1D(
                    DIM, max_seq_len=next_pow2(n), heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK_SIZE
                )
            else:
                layer = mod.HAttention1D(DIM, heads=HEADS, dim_head=DIM_HEAD, block_size=BLOCK_SIZE)
        else:
            raise ValueError(f"unknown impl {impl!r}")
        x = torch.randn(1, n, DIM, generator=gen).requires_grad_()
        grad = torch.randn(1, n, DIM, generator=gen)

        def fn():
            return layer(x)

        leaves = [x, *layer.parameters()]
    else:
        raise ValueError(f"unknown section {section!r}")

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad)
        del out

    def clear():
        for t in leaves:
            t.grad = None

    return step, clear


def detect_sdpa_ops(step) -> list[str]:
    """aten op names around scaled_dot_product_attention in one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {e.key for e in prof.key_averages()}
    pattern = re.compile(r"scaled_dot_product|flash|efficient_attention|_softmax|attention_math")
    return sorted(n for n in names if pattern.search(n))


def classify_sdpa_backend(ops: list[str]) -> str:
    joined = " ".join(ops)
    if "_scaled_dot_product_flash_attention_for_cpu" in joined:
        return "flash (aten::_scaled_dot_product_flash_attention_for_cpu)"
    if "_scaled_dot_product_attention_math" in joined or "_softmax" in joined:
        return "math (aten::_scaled_dot_product_attention_math)"
    if "efficient_attention" in joined:
        return "memory-efficient"
    return "unknown: " + (", ".join(ops) or "no attention op seen")


def measure_attention(spec: dict) -> dict:
    import torch

    section, impl, n, causal = spec["section"], spec["impl"], spec["n"], spec["causal"]
    res: dict = {"section": section, "impl": impl, "n": n, "causal": causal}
    if impl == "legacy":
        res["padded_n"] = next_pow2(n)
    torch.manual_seed(0)
    if n > WARM_N:  # initialise libraries / kernels on a tiny problem of the same code path
        small, small_clear = build_step(section, impl, WARM_N, causal)
        small()
        del small, small_clear
    step, clear = build_step(section, impl, n, causal)
    res.update(_package_info(impl))
    gc.collect()

    base = rss_bytes()
    res["peak_reset"] = reset_peak()
    with RunTimer() as timer:
        step()
    first = timer.wall
    res["peak_rss_bytes"] = peak_bytes() - base
    res["baseline_rss_bytes"] = base
    res["first_run_s"] = first
    res["first_run_other_cpu_share"] = timer.other_share

    times: list[float] = []
    rep_peaks: list[int] = []
    shares: list[float | None] = []
    if first > spec["single_run_seconds"]:
        times = [first]
        shares = [timer.other_share]
        res["single_sample"] = True
    else:
        used = first
        while len(times) < spec["reps"] and (not times or used < spec["rep_budget"]):
            clear()
            gc.collect()
            base_r = rss_bytes()
            reset_peak()
            with RunTimer() as timer:
                step()
            rep_peaks.append(peak_bytes() - base_r)
            times.append(timer.wall)
            shares.append(timer.other_share)
            used += timer.wall
        res["single_sample"] = False
    res["times_s"] = times
    res["other_cpu_share"] = shares
    known = [x for x in shares if x is not None]
    res["max_other_cpu_share"] = max(known) if known else None
    res["median_s"] = statistics.median(times)
    res["rep_peak_rss_bytes"] = rep_peaks
    res["threads"] = torch.get_num_threads()
    if impl == "sdpa":
        small, _ = build_step(section, impl, WARM_N, causal)
        ops = detect_sdpa_ops(small)
        res["sdpa_ops"] = ops
        res["sdpa_backend"] = classify_sdpa_backend(ops)
    res["status"] = "ok"
    return res


def measure_reversible(spec: dict) -> dict:
    import torch

    pkg = _import_package("ours")
    depth, reversible, seq = spec["depth"], spec["reversible"], spec["seq"]
    res: dict = {"section": "reversible", "impl": "ours", "depth": depth, "reversible": reversible, "n": seq}
    res.update(_package_info("ours"))
    torch.manual_seed(0)
    model = pkg.HTransformer1D(
        num_tokens=256,
        dim=256,
        depth=depth,
        max_seq_len=seq,
        heads=4,
        dim_head=64,
        block_size=BLOCK_SIZE,
        causal=False,
        reversible=reversible,
    )
    gen = torch.Generator().manual_seed(1)

    def run(tokens, grad, hooks=None):
        for p in model.parameters():
            p.grad = None
        if hooks is None:
            logits = model(tokens)
        else:
            with torch.autograd.graph.saved_tensors_hooks(*hooks):
                logits = model(tokens)
        logits.backward(grad)

    small = torch.randint(0, 256, (1, WARM_N), generator=gen)
    run(small, torch.randn(1, WARM_N, 256, generator=gen))
    tokens = torch.randint(0, 256, (1, seq), generator=gen)
    grad = torch.randn(1, seq, 256, generator=gen)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    n_saved = [0]

    def pack(t):
        n_saved[0] += 1
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    def unpack(t):
        return t

    for p in model.parameters():
        p.grad = None
    gc.collect()
    base = rss_bytes()
    res["peak_reset"] = reset_peak()
    with RunTimer() as timer:
        run(tokens, grad, hooks=(pack, unpack))
    first = timer.wall
    res["peak_rss_bytes"] = peak_bytes() - base
    res["first_run_s"] = first
    res["saved_tensors"] = n_saved[0]
    res["saved_storages"] = len(saved)
    res["saved_total_bytes"] = sum(saved.values())
    res["saved_param_bytes"] = sum(b for p, b in saved.items() if p in param_ptrs)
    res["saved_activation_bytes"] = res["saved_total_bytes"] - res["saved_param_bytes"]
    times, shares = [], [timer.other_share]
    for _ in range(spec["reps"]):
        with RunTimer() as timer:
            run(tokens, grad)
        times.append(timer.wall)
        shares.append(timer.other_share)
    res["times_s"] = times
    res["other_cpu_share"] = shares
    known = [x for x in shares if x is not None]
    res["max_other_cpu_share"] = max(known) if known else None
    res["median_s"] = statistics.median(times) if times else first
    res["threads"] = torch.get_num_threads()
    res["status"] = "ok"
    return res


def worker_main(specs: list[dict]) -> None:
    import torch

    if specs and specs[0].get("threads"):
        torch.set_num_threads(specs[0]["threads"])
    for spec in specs:
        try:
            if spec["section"] == "reversible":
                res = measure_reversible(spec)
            else:
                res = measure_attention(spec)
        except Exception as exc:  # noqa: BLE001 - any failure is recorded in the table, e.g. 0.1.9's assertions
            res = {k: spec.get(k) for k in ("section", "impl", "n", "causal", "depth", "reversible")}
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            res["status"] = f"error: {type(exc).__name__}" + (f": {msg}" if msg else "")
            res["traceback"] = traceback.format_exc()
        gc.collect()
        print(RESULT_TAG + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# parent side: plan, legacy install, environment, subprocesses, report


def reps_for(n: int, quick: bool) -> int:
    if quick:
        return 1
    return 5  # --rep-budget cuts the slow ones (dense attention at 16k-32k) short


def ensure_legacy(legacy_dir: Path) -> tuple[bool, str]:
    marker = legacy_dir / ".installed"
    if marker.exists() and (legacy_dir / "h_transformer_1d").is_dir():
        return True, "cached"
    legacy_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(legacy_dir)]
    cmd += LEGACY_PACKAGES
    print("installing the 0.1.9 baseline:", " ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        text = (proc.stderr or proc.stdout or "").strip()
        return False, text.splitlines()[-1] if text else f"pip exited with code {proc.returncode}"
    marker.write_text(" ".join(LEGACY_PACKAGES) + "\n")
    return True, "installed"


def legacy_versions(legacy_dir: Path) -> dict:
    out = {}
    for info in legacy_dir.glob("*.dist-info"):
        m = re.match(r"(.+)-([^-]+)\.dist-info$", info.name)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# glibc malloc hands large blocks back to the OS on free, so every large temporary page-faults in
# again on the next allocation; at 32k that made our fwd+bwd 1.8x slower per token than at 8k. These
# settings keep freed memory in the process. Applied identically to every implementation's worker.
TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "17179869184",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
WORKER_EXTRA_ENV: dict = {}


def worker_env(impl: str, legacy_dir: Path) -> dict:
    env = {**os.environ, **WORKER_EXTRA_ENV}
    extra = {"ours": str(REPO_ROOT), "legacy": str(legacy_dir)}.get(impl)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    # never let the other package in through an inherited PYTHONPATH
    parts = [p for p in parts if Path(p).resolve() not in (REPO_ROOT, legacy_dir.resolve())]
    if extra:
        parts.insert(0, extra)
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_worker(specs: list[dict], impl: str, legacy_dir: Path, timeout: float) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(specs)]
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            env=worker_env(impl, legacy_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(BENCH_DIR),
        )
    except subprocess.TimeoutExpired:
        return [dict(spec, status=f"error: worker timed out after {timeout:.0f} s") for spec in specs]
    results = [json.loads(line[len(RESULT_TAG) :]) for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if len(results) < len(specs):
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        why = f"error: worker exited with code {proc.returncode}" + (f" ({' | '.join(tail)})" if tail else "")
        results += [dict(spec, status=why) for spec in specs[len(results) :]]
    return results


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def git_revision() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "h_transformer_1d"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return sha + (" (package has uncommitted changes)" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


def collect_env(threads: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    backends = {}
    for causal in (False, True):
        q, k, v = (torch.randn(1, HEADS, WARM_N, DIM_HEAD).requires_grad_() for _ in range(3))

        def step(q=q, k=k, v=v, causal=causal):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

        ops = detect_sdpa_ops(step)
        backends["causal" if causal else "non_causal"] = {"backend": classify_sdpa_backend(ops), "ops": ops}
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "sdpa_cpu_backend": backends,
        "git_revision": git_revision(),
        "platform": platform.platform(),
        "loadavg_start": loadavg(),
    }


def make_plan(args) -> list[dict]:
    common = {
        "threads": args.threads,
        "rep_budget": args.rep_budget,
        "single_run_seconds": args.single_run_seconds,
    }
    plan = []
    for n in args.sizes:
        for causal in (False, True):
            if "core" in args.sections:
                for impl in CORE_IMPLS:
                    plan.append(
                        dict(common, section="core", impl=impl, n=n, causal=causal, reps=reps_for(n, args.quick))
                    )
            if "layer" in args.sections:
                for impl in LAYER_IMPLS:
                    plan.append(
                        dict(common, section="layer", impl=impl, n=n, causal=causal, reps=reps_for(n, args.quick))
                    )
    if "reversible" in args.sections:
        for depth in args.rev_depths:
            for reversible in (False, True):
                plan.append(
                    dict(
                        common,
                        section="reversible",
                        impl="ours",
                        depth=depth,
                        reversible=reversible,
                        seq=REV_SEQ,
                        reps=0 if args.quick else 2,
                    )
                )
    return plan


def series_key(spec: dict) -> tuple:
    return (spec["section"], spec["impl"], spec.get("causal"))


def result_key(r: dict) -> tuple:
    if r.get("section") == "reversible":
        return ("reversible", r.get("depth"), r.get("reversible"))
    return (r.get("section"), r.get("impl"), r.get("n"), r.get("causal"))


# ---------------------------------------------------------------------------------------------
# report


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 1000:
        return f"{ms:.1f}"
    return f"{ms:,.0f}"


def fmt_mib(nbytes: float) -> str:
    mib = nbytes / 2**20
    if abs(mib) < 10:
        return f"{mib:.1f}"
    return f"{mib:,.0f}"


def lookup(results: list[dict], section: str, impl: str, n: int, causal: bool) -> dict | None:
    for r in results:
        if r.get("section") == section and r.get("impl") == impl and r.get("n") == n and r.get("causal") == causal:
            return r
    return None


CONTENDED_SHARE = 0.15  # other processes used more than this share of all CPUs during a timed run


def contended(r: dict) -> bool:
    return (r.get("max_other_cpu_share") or 0.0) > CONTENDED_SHARE


def time_cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r.get("status") != "ok":
        return r.get("status", "?")
    return fmt_ms(r["median_s"]) + ("\\*" if r.get("single_sample") else "") + (" †" if contended(r) else "")


def mem_cell(r: dict | None) -> str:
    if r is None or r.get("status") != "ok":
        return "—"
    return fmt_mib(r["peak_rss_bytes"])


def ratio_cell(num: dict | None, den: dict | None) -> str:
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return "—"
    return f"{num['median_s'] / den['median_s']:.2f}"


def compute_ratios(results: list[dict]) -> list[dict]:
    rows = []
    pairs = [(32768, 8192, 4.5), (4097, 4096, 1.2)]
    for section, impls in (("core", CORE_IMPLS), ("layer", LAYER_IMPLS)):
        for impl in impls:
            for num_n, den_n, target in pairs:
                for causal in (False, True):
                    a, b = (lookup(results, section, impl, m, causal) for m in (num_n, den_n))
                    value = None
                    if a and b and a.get("status") == "ok" and b.get("status") == "ok":
                        value = a["median_s"] / b["median_s"]
                    rows.append(
                        {
                            "section": section,
                            "impl": impl,
                            "causal": causal,
                            "numerator_n": num_n,
                            "denominator_n": den_n,
                            "ratio": value,
                            "target": target if impl == "ours" else None,
                            "meets_target": (value <= target) if (value is not None and impl == "ours") else None,
                        }
                    )
    return rows


def command_md(command: str) -> str:
    return command if command.startswith("`") else f"`{command}`"


def write_markdown(path: Path, data: dict) -> None:
    env, results, cfg = data["env"], data["results"], data["config"]
    sizes = cfg["sizes"]
    lines = ["# CPU benchmark: hierarchical attention (this package) vs dense SDPA vs h-transformer-1d 0.1.9", ""]
    lines.append(
        f"Generated by {command_md(cfg['command'])} on {env['date']} "
        f"({'QUICK smoke run' if cfg['quick'] else 'full run'})."
    )
    lines.append("")
    lines.append("## Environment")
    lines.append("")
    sd = env["sdpa_cpu_backend"]
    lines += [
        f"- torch {env['torch']}, Python {env['python']}, {env['platform']}",
        (
            f"- CPU: {env['cpu_model']}, {env['logical_cpus']} logical CPUs, flags: "
            f"{' '.join(env['cpu_flags']) or '—'}, torch CPU capability {env['torch_cpu_capability']}"
        ),
        f"- torch intra-op threads: {env['torch_threads']}",
        f"- malloc in every worker: {cfg.get('malloc', 'default')}",
        (
            "- SDPA backend on this CPU (float32, D=64, forward+backward, detected with torch.profiler): "
            f"non-causal {sd['non_causal']['backend']}; causal {sd['causal']['backend']}"
        ),
        f"- this package: `h_transformer_1d` {cfg.get('ours_version', '?')}, git {env['git_revision']}",
    ]
    if cfg.get("legacy"):
        lines.append(
            "- baseline: "
            + ", ".join(f"{k} {v}" for k, v in sorted(cfg.get("legacy_versions", {}).items()))
            + f" (installed with `pip install --no-deps --target {cfg['legacy_dir_rel']}`)"
        )
    else:
        lines.append(f"- baseline 0.1.9: not run ({cfg.get('legacy_note', '--no-legacy')})")
    lines += [
        f"- block size {BLOCK_SIZE}; float32; batch 1; {HEADS} heads x {DIM_HEAD}; layers: dim {DIM}",
        (
            "- time: median wall time of forward+backward after one warm-up run at the same N "
            "(up to 5 timed runs at every N; fewer once the runs at one N have "
            f"used {cfg['rep_budget']:.0f} s). `*` = the first run took over {cfg['single_run_seconds']:.0f} s and "
            "is the only sample."
        ),
        "- memory: increase of the worker process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over "
        "its RSS just before the first forward+backward at that N; inputs, grad_out and parameters already "
        "exist at the baseline. Each measurement runs in a fresh subprocess."
        + (
            " QUICK mode: one worker per implementation runs all its sizes, so memory numbers are indicative only."
            if cfg["quick"]
            else ""
        ),
        "",
    ]

    lines.append("## Key ratios (time of forward+backward)")
    lines.append("")
    lines.append("| what | non-causal | causal | target |")
    lines.append("|---|---|---|---|")
    for section in ("core", "layer"):
        for impl in CORE_IMPLS if section == "core" else LAYER_IMPLS:
            for num_n, den_n in ((32768, 8192), (4097, 4096)):
                cells = []
                target = None
                for causal in (False, True):
                    row = next(
                        r
                        for r in data["ratios"]
                        if r["section"] == section
                        and r["impl"] == impl
                        and r["causal"] == causal
                        and r["numerator_n"] == num_n
                    )
                    target = row["target"]
                    if row["ratio"] is None:
                        cells.append("—")
                    else:
                        mark = "" if row["meets_target"] is None else (" ✅" if row["meets_target"] else " ❌")
                        cells.append(f"{row['ratio']:.2f}{mark}")
                tgt = f"<= {target}" if target else "(context)"
                lines.append(
                    f"| {section}: {IMPL_LABEL[impl]} time({num_n})/time({den_n}) | {cells[0]} | {cells[1]} | {tgt} |"
                )
    lines.append("")

    def section_tables(section: str, impls: list[str], title: str, blurb: str):
        lines.append(f"## {title}")
        lines.append("")
        lines.append(blurb)
        lines.append("")
        for causal in (False, True):
            lines.append(f"### {'causal' if causal else 'non-causal'}")
            lines.append("")
            head = ["N"] + [f"{IMPL_LABEL[i]} ms" for i in impls]
            head += [f"{IMPL_LABEL[i]}/ours time" for i in impls if i != "ours"]
            head += [f"{IMPL_LABEL[i]} peak MiB" for i in impls]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for n in sizes:
                rs = {i: lookup(results, section, i, n, causal) for i in impls}
                row = [f"{n:,}"] + [time_cell(rs[i]) for i in impls]
                row += [ratio_cell(rs[i], rs["ours"]) for i in impls if i != "ours"]
                row += [mem_cell(rs[i]) for i in impls]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")

    section_tables(
        "core",
        CORE_IMPLS,
        "(a) Attention core: forward+backward on (1, 8, N, 64) float32 q, k, v",
        f"ours = `h_attention(q, k, v, block_size={BLOCK_SIZE}, causal=...)`; "
        "SDPA = `F.scaled_dot_product_attention(q, k, v, is_causal=...)` (exact dense attention).",
    )
    section_tables(
        "layer",
        LAYER_IMPLS,
        "(b) One attention layer with projections: forward+backward on x (1, N, 512)",
        "ours = `HAttention1D` / `CausalHAttention1D` (dim 512, 8 heads x 64, block 128; applies rotary "
        "embeddings to q and k); SDPA = the same two projections around `F.scaled_dot_product_attention` "
        "(no rotary); 0.1.9 = `HAttention1D(512, heads=8, dim_head=64, block_size=128)` / "
        "`CausalHAttention1D(512, max_seq_len=next_pow2(N), ...)` from h-transformer-1d 0.1.9 (no "
        "`pos_emb` given, so no rotary; it pads every input to the next power of two, e.g. 4,097 -> 8,192). "
        "0.1.9 does not compute the same attention as this package (DESIGN.md section 4): a speed/API "
        "baseline only.",
    )

    rev = [r for r in results if r.get("section") == "reversible"]
    if rev:
        lines.append("## Reversible activation memory")
        lines.append("")
        lines.append(
            f"`HTransformer1D(num_tokens=256, dim=256, depth=d, max_seq_len={REV_SEQ}, heads=4, dim_head=64, "
            f"block_size={BLOCK_SIZE}, causal=False, reversible=...)`, forward on (1, {REV_SEQ}) tokens. "
            "Saved = bytes of the unique storages packed by `torch.autograd.graph.saved_tensors_hooks` during "
            "the forward (parameters excluded; total including parameters in the JSON). Peak = peak RSS "
            "increase of forward+backward (same method as above). Time = median forward+backward."
        )
        lines.append("")
        lines.append(
            "| depth | saved MiB, plain | saved MiB, reversible | peak MiB, plain | peak MiB, reversible | ms, plain | ms, reversible |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        for depth in sorted({r["depth"] for r in rev}):
            cells = {}
            for flag in (False, True):
                r = next((x for x in rev if x["depth"] == depth and x["reversible"] == flag), None)
                ok = r is not None and r.get("status") == "ok"
                cells[flag] = (
                    fmt_mib(r["saved_activation_bytes"]) if ok else (r or {}).get("status", "not run"),
                    fmt_mib(r["peak_rss_bytes"]) if ok else "—",
                    (fmt_ms(r["median_s"]) + (" †" if contended(r) else "")) if ok else "—",
                )
            lines.append(
                f"| {depth} | {cells[False][0]} | {cells[True][0]} | {cells[False][1]} | {cells[True][1]} | "
                f"{cells[False][2]} | {cells[True][2]} |"
            )
        lines.append("")

    hashes = sorted({r["package_sha1"] for r in results if r.get("impl") == "ours" and r.get("package_sha1")})
    errors = [r for r in results if r.get("status", "ok") != "ok"]
    noisy = [r for r in results if r.get("status") == "ok" and contended(r)]
    lines.append("## Notes")
    lines.append("")
    lines.append(
        f"- load average at start / end: {env.get('loadavg_start')} / {env.get('loadavg_end', '?')}. `†` = during at "
        f"least one timed run other processes used more than {CONTENDED_SHARE:.0%} of all CPUs (from /proc/stat "
        "minus the worker's own CPU time), so that time is inflated; "
        f"{len(noisy)} of {sum(1 for r in results if r.get('status') == 'ok')} measurements are marked. "
        "Before each measurement the runner waits (up to `--wait-idle` s, "
        f"`--max-total-wait` s in all) for other processes to go quiet; it waited {cfg.get('waited_for_idle_s', 0)} s."
    )
    if len(hashes) > 1:
        lines.append(
            f"- WARNING: the `ours` measurements come from {len(hashes)} different versions of the package "
            f"sources ({', '.join(hashes)}; `package_sha1` in the JSON): it changed during the run."
        )
    elif hashes:
        lines.append(f"- every `ours` measurement ran the same package sources (sha1 {hashes[0]} of its .py files).")
    if cfg.get("first_pass"):
        fp = cfg["first_pass"]
        passes = cfg.get("retry_passes") or [{"date": env["date"], "retried": cfg.get("retried", 0)}]
        retries = "; ".join(f"on {p['date']} it re-ran {p['retried']}" for p in passes)
        lines.append(
            f"- several passes: the full run started {fp['date']} (load average {fp['loadavg_start']} / "
            f"{fp['loadavg_end']}); then `--retry-contended` re-ran the measurements that were still contended or "
            f"failed, and with `--rerun-impls` every measurement of the named implementations ({retries}); of two "
            "tries of a contended measurement the less contended one is kept, a forced re-run always replaces the "
            "old one (`retried`, `rerun_forced` in the JSON)."
        )
    lines.append(f"- total benchmark wall time: {data['wall_s'] / 60:.1f} min.")
    if errors:
        lines.append(
            f"- {len(errors)} measurement(s) did not produce a number; their status is in the tables and the JSON."
        )
    lines.append(
        "- raw numbers (every timed run, per-run peaks, SDPA ops seen): `attention_cpu.json`; plot: `attention_cpu.png`."
    )
    lines.append("")
    path.write_text("\n".join(lines))


def write_plot(path: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["results"]
    colors = {"ours": "tab:blue", "sdpa": "tab:orange", "legacy": "tab:green"}
    rev = [r for r in results if r.get("section") == "reversible" and r.get("status") == "ok"]
    nrows = 3 if rev else 2
    fig, axes = plt.subplots(nrows, 3, figsize=(16, 4.6 * nrows))
    for row, (section, impls, title) in enumerate(
        (("core", CORE_IMPLS, "attention core (1, 8, N, 64)"), ("layer", LAYER_IMPLS, "attention layer, dim 512"))
    ):
        ax_mem = axes[row][2]
        for col, causal in enumerate((False, True)):
            ax = axes[row][col]
            flagged = False
            for impl in impls:
                rs = sorted(
                    (
                        r
                        for r in results
                        if r.get("section") == section
                        and r.get("impl") == impl
                        and r.get("causal") == causal
                        and r.get("status") == "ok"
                    ),
                    key=lambda r: r["n"],
                )
                # lines through powers of two; other N (4097) as hollow markers, so padding shows as a jump
                line = [r for r in rs if r["n"] & (r["n"] - 1) == 0]
                odd = [r for r in rs if r["n"] & (r["n"] - 1)]
                if not rs:
                    continue
                marker = "o" if not causal else "s"
                for group, style in (
                    (line, {"marker": marker}),
                    (odd, {"marker": marker, "mfc": "none", "ls": "none"}),
                ):
                    if not group:
                        continue
                    xs = [r["n"] for r in group]
                    label = IMPL_LABEL[impl] if group is line else None
                    ax.plot(xs, [r["median_s"] * 1e3 for r in group], color=colors[impl], label=label, **style)
                    ax_mem.plot(
                        xs,
                        [max(r["peak_rss_bytes"] / 2**20, 1.0) for r in group],
                        ls=("-" if not causal else "--") if group is line else "none",
                        color=colors[impl],
                        label=f"{IMPL_LABEL[impl]} {'causal' if causal else 'non-causal'}" if group is line else None,
                        **{k: v for k, v in style.items() if k != "ls"},
                    )
                noisy = [r for r in rs if contended(r)]
                if noisy:
                    label = None if flagged else "† busy machine"
                    flagged = True
                    xs, ts = [r["n"] for r in noisy], [r["median_s"] * 1e3 for r in noisy]
                    ax.plot(xs, ts, "x", color="red", ms=10, label=label)
            if any(r.get("n", 0) & (r.get("n", 0) - 1) for r in results if r.get("section") == section):
                ax.plot([], [], "o", color="gray", mfc="none", label="hollow: N not a power of 2")
            # slope guides through the smallest 'ours' point
            ours = sorted(
                (r["n"], r["median_s"] * 1e3)
                for r in results
                if r.get("section") == section
                and r.get("impl") == "ours"
                and r.get("causal") == causal
                and r.get("status") == "ok"
            )
            if ours:
                n0, t0 = ours[0]
                xs = [n0, max(r["n"] for r in results if r.get("section") == section)]
                ax.plot(xs, [t0 * x / n0 for x in xs], ":", color="gray", lw=1, label="∝ N")
                ax.plot(xs, [t0 * (x / n0) ** 2 for x in xs], "-.", color="lightgray", lw=1, label="∝ N²")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (sequence length)")
            ax.set_ylabel("forward+backward time (ms)")
            ax.set_title(f"{title}: {'causal' if causal else 'non-causal'}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_mem.set_xscale("log", base=2)
        ax_mem.set_yscale("log")
        ax_mem.set_xlabel("N (sequence length)")
        ax_mem.set_ylabel("peak RSS increase (MiB; < 1 drawn at 1)")
        ax_mem.set_title(f"{title}: peak memory")
        ax_mem.grid(True, which="both", alpha=0.3)
        ax_mem.legend(fontsize=7)
    if rev:
        for col, (key, ylabel, scale, short) in enumerate(
            (
                ("saved_activation_bytes", "saved for backward (MiB, excl. params)", 2**-20, "saved for backward"),
                ("peak_rss_bytes", "peak RSS increase fwd+bwd (MiB)", 2**-20, "peak RSS increase"),
                ("median_s", "forward+backward time (ms)", 1e3, "fwd+bwd time"),
            )
        ):
            ax = axes[2][col]
            for flag, color in ((False, "tab:red"), (True, "tab:purple")):
                pts = sorted((r["depth"], r[key] * scale) for r in rev if r["reversible"] == flag)
                if pts:
                    ax.plot(*zip(*pts), "o-", color=color, label="reversible" if flag else "plain")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("depth")
            ax.set_ylabel(ylabel)
            ax.set_title(f"HTransformer1D dim 256, N={REV_SEQ}: {short}")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    env = data["env"]
    fig.suptitle(
        f"CPU benchmark, float32, block {BLOCK_SIZE} — torch {env['torch']}, {env['cpu_model']}, "
        f"{env['torch_threads']} threads",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: N in {1024, 2048}, 1 timed run, depths {1, 2}")
    p.add_argument("--no-legacy", action="store_true", help="skip the h-transformer-1d 0.1.9 baseline")
    p.add_argument("--legacy-dir", type=Path, default=DEFAULT_LEGACY_DIR, help="where 0.1.9 is pip-installed")
    p.add_argument(
        "--out-dir", type=Path, default=None, help="default benchmarks/results (--quick: benchmarks/results/quick)"
    )
    p.add_argument("--sizes", type=int, nargs="+", help="sequence lengths (default 1024 ... 32768)")
    p.add_argument(
        "--sections", nargs="+", default=["core", "layer", "reversible"], choices=["core", "layer", "reversible"]
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers (default: torch's)")
    p.add_argument("--rep-budget", type=float, default=45.0, help="stop adding timed runs at one N after this many s")
    p.add_argument(
        "--single-run-seconds", type=float, default=20.0, help="a first run longer than this is the only sample"
    )
    p.add_argument(
        "--max-run-seconds",
        type=float,
        default=150.0,
        help="once one run of an implementation takes longer, its larger N are skipped",
    )
    p.add_argument("--worker-timeout", type=float, default=900.0, help="kill a worker after this many s")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=None,
        help="before each measurement wait up to this many s while other processes keep more than "
        "--idle-cores CPUs busy (default 30, quick 0)",
    )
    p.add_argument("--idle-cores", type=float, default=0.3, help="see --wait-idle")
    p.add_argument("--max-total-wait", type=float, default=300.0, help="cap on all --wait-idle waiting together")
    p.add_argument(
        "--retry-contended",
        action="store_true",
        help="load the existing attention_cpu.json in --out-dir and re-run only the measurements that are "
        "marked contended (†) or failed; of two tries the less contended one is kept",
    )
    p.add_argument(
        "--rerun-impls",
        nargs="+",
        default=[],
        choices=["ours", "sdpa", "legacy"],
        help="with --retry-contended: re-run every measurement of these implementations and keep the new "
        "numbers (e.g. `--rerun-impls ours` after the package changed)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the .md and .png from the existing .json in --out-dir"
    )
    p.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="tuned (default): every worker runs with glibc malloc keeping freed memory (see TUNED_MALLOC); "
        "default: the machine's malloc settings",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    args.sizes = sorted(set(args.sizes))
    args.rev_depths = [1, 2] if args.quick else REV_DEPTHS
    if args.rerun_impls and not args.retry_contended:
        p.error("--rerun-impls needs --retry-contended")
    if args.out_dir is None:
        args.out_dir = DEFAULT_OUT_DIR / "quick" if args.quick else DEFAULT_OUT_DIR
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 30.0
    return args


def wait_for_idle(max_wait: float, idle_cores: float) -> tuple[float, float | None]:
    """Wait (up to max_wait s) until other processes use at most idle_cores CPUs; (waited s, busy cores)."""
    t0 = time.perf_counter()
    busy = machine_busy_cores(0.5) if max_wait > 0 else None
    while busy is not None and busy > idle_cores and time.perf_counter() - t0 < max_wait:
        time.sleep(2.0)
        busy = machine_busy_cores(0.5)
    return time.perf_counter() - t0, busy


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        worker_main(json.loads(args.worker))
        return

    if args.report_only:
        data = json.loads((args.out_dir / "attention_cpu.json").read_text())
        write_markdown(args.out_dir / "attention_cpu.md", data)
        write_plot(args.out_dir / "attention_cpu.png", data)
        return

    from tqdm import tqdm

    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    legacy_dir = args.legacy_dir.resolve()
    legacy_ok, legacy_note = False, "--no-legacy"
    if not args.no_legacy:
        legacy_ok, legacy_note = ensure_legacy(legacy_dir)
        if not legacy_ok:
            print(f"warning: could not install the 0.1.9 baseline: {legacy_note}", file=sys.stderr)

    WORKER_EXTRA_ENV.update(TUNED_MALLOC if args.malloc == "tuned" else {})
    env = collect_env(args.threads)
    plan = make_plan(args)
    if args.no_legacy:
        plan = [s for s in plan if s["impl"] != "legacy"]

    try:
        legacy_dir_rel = str(legacy_dir.relative_to(REPO_ROOT))
    except ValueError:
        legacy_dir_rel = str(legacy_dir)
    config = {
        "command": "`python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]) + "`",
        "quick": args.quick,
        "sizes": args.sizes,
        "block_size": BLOCK_SIZE,
        "heads": HEADS,
        "dim_head": DIM_HEAD,
        "dim": DIM,
        "dtype": "float32",
        "rep_budget": args.rep_budget,
        "single_run_seconds": args.single_run_seconds,
        "max_run_seconds": args.max_run_seconds,
        "threads_requested": args.threads,
        "legacy": legacy_ok,
        "legacy_note": legacy_note,
        "legacy_dir_rel": legacy_dir_rel,
        "legacy_versions": legacy_versions(legacy_dir) if legacy_ok else {},
        "memory_method": "VmHWM - VmRSS from /proc/self/status, VmHWM reset via /proc/self/clear_refs ('5')",
        "malloc": WORKER_EXTRA_ENV or "default",
    }
    data = {"env": env, "config": config, "results": [], "ratios": [], "wall_s": 0.0}
    json_path = args.out_dir / "attention_cpu.json"
    previous: dict[tuple, dict] = {}
    previous_wall = 0.0
    if args.retry_contended:
        if not json_path.exists():
            sys.exit(f"--retry-contended: no {json_path} to retry")
        old = json.loads(json_path.read_text())
        previous = {result_key(r): r for r in old["results"]}
        previous_wall = old.get("wall_s", 0.0)
        config["command"] = command_md(old["config"]["command"]) + ", then " + config["command"]
        config["first_pass"] = old["config"].get("first_pass") or {
            "date": old["env"]["date"],
            "loadavg_start": old["env"].get("loadavg_start"),
            "loadavg_end": old["env"].get("loadavg_end"),
            "waited_for_idle_s": old["config"].get("waited_for_idle_s"),
        }
        config["retry_passes"] = old["config"].get("retry_passes", []) + [{"date": env["date"], "retried": 0}]
        config["retried"] = 0

    def save():
        data["wall_s"] = previous_wall + time.perf_counter() - start
        data["ratios"] = compute_ratios(data["results"])
        ours = next((r for r in data["results"] if r.get("impl") == "ours" and r.get("package_version")), None)
        config["ours_version"] = ours["package_version"] if ours else "?"
        json_path.write_text(json.dumps(data, indent=1))

    # quick mode: one worker per (implementation, section kind) to save process start-up time
    if args.quick:
        groups: dict[tuple, list[dict]] = {}
        for spec in plan:
            groups.setdefault((spec["impl"], spec["section"] == "reversible"), []).append(spec)
        batches = list(groups.values())
    else:
        batches = [[spec] for spec in plan]

    too_slow: dict[tuple, float] = {}
    total_waited = 0.0
    bar = tqdm(total=len(plan), unit="meas", dynamic_ncols=True)
    for batch in batches:
        first = batch[0]
        label = f"{first['section']} {IMPL_LABEL[first['impl']]} " + (
            f"N={first['n']} {'causal' if first['causal'] else 'non-causal'}"
            if first["section"] != "reversible"
            else f"depth={first['depth']} rev={first['reversible']}"
        )
        bar.set_postfix_str(label if len(batch) == 1 else f"{label} (+{len(batch) - 1} more)")
        key = series_key(first)
        prev = previous.get(result_key(first)) if len(batch) == 1 else None
        forced = prev is not None and prev.get("impl") in args.rerun_impls
        if prev is not None and prev.get("status") == "ok" and not contended(prev) and not forced:
            res = [prev]  # --retry-contended: a clean earlier measurement is kept
        elif len(batch) == 1 and key in too_slow and first["section"] != "reversible":
            res = [dict(first, status="skipped (too slow)", reason=f"a smaller N took {too_slow[key]:.0f} s")]
        elif first["impl"] == "legacy" and not legacy_ok:
            res = [dict(s, status=f"error: 0.1.9 not installed ({legacy_note})") for s in batch]
        else:
            allowed = min(args.wait_idle, max(0.0, args.max_total_wait - total_waited))
            waited, busy = wait_for_idle(allowed, args.idle_cores)
            total_waited += waited
            res = run_worker(batch, first["impl"], legacy_dir, args.worker_timeout)
            for r in res:
                r["waited_for_idle_s"], r["busy_cores_before"] = round(waited, 1), busy
            if prev is not None:
                config["retried"] += 1
                config["retry_passes"][-1]["retried"] += 1
                new = res[0]
                new["retried"] = True
                if forced:
                    new["rerun_forced"] = True
                elif prev.get("status") == "ok" and (
                    new.get("status") != "ok"
                    or (new.get("max_other_cpu_share") or 0.0) > (prev.get("max_other_cpu_share") or 0.0)
                ):
                    res = [
                        dict(
                            prev,
                            retried=True,
                            retry_status=new.get("status"),
                            retry_max_other_cpu_share=new.get("max_other_cpu_share"),
                        )
                    ]
        for r in res:
            if r.get("status") == "ok" and r.get("section") != "reversible":
                slowest = max([r["first_run_s"], *r["times_s"]])
                if slowest > args.max_run_seconds:
                    too_slow[series_key(r)] = slowest
            elif r.get("status", "").startswith("error"):
                tqdm.write(f"{label}: {r['status']}")
        data["results"].extend(res)
        save()
        bar.update(len(batch))
    bar.close()

    env["loadavg_end"] = loadavg()
    config["waited_for_idle_s"] = round(total_waited, 1)
    save()
    write_markdown(args.out_dir / "attention_cpu.md", data)
    write_plot(args.out_dir / "attention_cpu.png", data)
    print(f"wrote {args.out_dir / 'attention_cpu.md'}, .json, .png in {data['wall_s'] / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
