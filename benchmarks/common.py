"""What every study shares: the environment record, timing, the SDPA probe, the 0.1.9 baseline, training
subprocesses and their metrics, and the JSON / markdown / PNG writers. Studies (registry.py) hold no helpers."""

from __future__ import annotations

import csv
import ctypes
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LEGACY_DIR = BENCH_DIR / ".legacy"
# --no-deps: torch comes from the running environment, pip must not pull a CUDA build
LEGACY_PACKAGES = ["h-transformer-1d==0.1.9", "einops", "rotary-embedding-torch"]
# NVLink multicast stays off in every NCCL program a study starts (it can put a shared host's GPUs out of service)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# glibc returns large freed blocks to the OS, so every large temporary page-faults in again on the next call;
# these keep freed memory in the process (CPU studies run with them unless --malloc default)
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184",
                "MALLOC_TOP_PAD_": "1073741824"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- environment


def version(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_names() -> list[str]:
    """The visible GPUs' names, without creating a CUDA context in this process."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = names[: len([v for v in visible.split(",") if v.strip()])]
    return names


def environment(device: str) -> dict:
    import torch

    gpus = gpu_names() if device == "cuda" else []
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "card": gpus[0] if gpus else f"CPU: {cpu_model()}",
        "gpus": len(gpus),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton", "pytorch-triton"),
        "malloc": "tuned" if os.environ.get("MALLOC_TOP_PAD_") == TUNED_MALLOC["MALLOC_TOP_PAD_"] else "default",
        "autotune": os.environ.get("H_TRANSFORMER_1D_AUTOTUNE", "default"),
    }


# --------------------------------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def rss_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak(device: str) -> float:
    """Start a peak-memory window; returns the baseline (MiB) that peak_mib subtracts."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:  # freed memory back to the OS (tuned malloc keeps it), then VmHWM back to the current RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return rss_mib("VmRSS") or 0.0


def peak_mib(device: str, baseline: float) -> float | None:
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mib("VmHWM")
    return None if peak is None else max(0.0, peak - baseline)


def time_fn(fn, device: str, warmup: int = 1, reps: int = 5, budget_s: float = 60.0) -> dict:
    """Median / min milliseconds of fn() after `warmup` untimed calls (the first also gives the peak memory),
    with CUDA events on a GPU and perf_counter on the CPU; timed calls stop once `budget_s` is used."""
    import torch

    base = reset_peak(device)
    for _ in range(max(1, warmup)):
        fn()
    sync(device)
    peak = peak_mib(device, base)
    times: list[float] = []
    spent = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - spent < budget_s):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "reps": len(times), "peak_mib": peak}


def profile_fn(fn, device: str, top: int = 12) -> list[list]:
    """[kernel or op name, ms per call] of one profiled call of fn, the `top` most expensive (--profile)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    return [[e.key[:100], getattr(e, key, 0) / 1e3] for e in events[:top] if getattr(e, key, 0) > 0]


# ---------------------------------------------------------------------------------------------- SDPA backend

# substrings of the CUDA kernels of SDPA's fused backends, and of the aten ops of its CPU paths
SDPA_MARKS = ("sdpa", "flash", "fmha", "attention", "attn", "scaled_dot_product", "_softmax")


def sdpa_backend_of(names: list[str]) -> str:
    """SDPA's backend named from the kernels (CUDA) or aten ops (CPU) one call ran; no fused kernel: math."""
    lower = " ".join(names).lower()
    if "cudnn" in lower:
        return "cuDNN attention"
    if "flash" in lower:
        return "flash attention"
    if "fmha" in lower or "cutlass" in lower or "efficient" in lower:
        return "memory-efficient attention"
    if not names or "attention_math" in lower or "_softmax" in lower:
        return "math"
    return "other"


def sdpa_probe(device: str, batch: int, heads: int, seq_len: int, dim_head: int, causal: bool = True) -> dict:
    """Which SDPA backend a dense run at this shape uses: the CUDA kernels (bf16) or CPU aten ops (float32)
    of one profiled forward and backward. {"backend", "kernels", "shape"}, or {"error"} (a study goes on)."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q, k, v = (torch.randn(batch, heads, seq_len, dim_head, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sdpa(q, k, v, is_causal=causal).sum().backward()  # backend choice and cuDNN plans outside the trace
        sync(device)
        activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            sdpa(q, k, v, is_causal=causal).sum().backward()
            sync(device)
        on_device = device == "cuda"
        names = sorted({e.name for e in prof.events() if (e.device_type.name == "CUDA") == on_device
                        and (on_device or e.name.startswith("aten::")) and any(m in e.name.lower() for m in SDPA_MARKS)}
                       - {"aten::scaled_dot_product_attention"})
    except Exception as error:  # noqa: BLE001 (no study depends on the probe)
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"backend": sdpa_backend_of(names), "kernels": names,
            "shape": f"{batch}x{heads}x{seq_len}x{dim_head} {str(dtype)[6:]}{' causal' if causal else ''}"}


def sdpa_line(probe: dict | None) -> str:
    if not probe:
        return "SDPA backend: not recorded."
    if "error" in probe:
        return f"SDPA backend: not recorded ({probe['error']})."
    kernels = ", ".join(f"`{k[:90]}`" for k in probe["kernels"]) or "none of the fused backends'"
    return (f"SDPA backend (dense attention): **{probe['backend']}**; kernels of one forward and backward at "
            f"{probe['shape']}: {kernels}.")  # fmt: skip


# ---------------------------------------------------------------------------------- the 0.1.9 baseline


def ensure_legacy(target: Path = LEGACY_DIR) -> str | None:
    """pip-install h-transformer-1d 0.1.9 into `target` once; None when it is there, else why not."""
    if (target / ".installed").exists():
        return None
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    done = subprocess.run(command + LEGACY_PACKAGES, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"pip exit status {done.returncode}"])[-1]
    (target / ".installed").write_text(" ".join(LEGACY_PACKAGES) + "\n")
    return None


def import_package(legacy: bool):
    """`h_transformer_1d`, checked to be 0.1.9 (legacy) or this repository's: both have that import name."""
    import h_transformer_1d

    ours = Path(h_transformer_1d.__file__).resolve().is_relative_to(REPO_ROOT / "h_transformer_1d")
    if ours == legacy:
        raise RuntimeError(f"expected {'0.1.9' if legacy else 'this repository'}, imported {h_transformer_1d.__file__}")
    return h_transformer_1d


def child_env(extra: dict | None = None, legacy: Path | None = None) -> dict:
    """A child's environment: this repository (or only the 0.1.9 install and benchmarks/) on PYTHONPATH, multicast
    off."""
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    first = [str(legacy), str(BENCH_DIR)] if legacy else [str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(first + inherited)
    env.update(extra or {})
    return env


# ----------------------------------------------------------------------------------- training subprocesses


def run_logged(command: list[str], log: Path, env: dict, timeout: float | None = None) -> int:
    """Run `command` in its own session, output to `log`; past `timeout` s it gets SIGINT (train keeps its last
    checkpoint), then SIGKILL. Returns the exit status."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + subprocess.list2cmdline(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    return proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            return proc.wait()


def run_config(run_dir: Path) -> dict:
    """The configuration of a training run's last complete checkpoint ({} when it has none yet)."""
    from h_transformer_1d.apps.core.checkpoint import CheckpointError, locate

    try:
        return json.loads((locate(run_dir) / "config.json").read_text())["config"]
    except (CheckpointError, OSError, KeyError, ValueError):
        return {}


def read_metrics(run_dir: Path, require: tuple = ("tokens", "tokens_per_s")) -> list[dict]:
    """metrics.csv rows as numbers (None for an empty cell); a row cut short by a kill (no `require` value) is
    dropped."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            try:
                row = {k: (float(v) if v not in ("", None) else None) for k, v in raw.items() if k is not None}
                row["step"] = int(row["step"])
            except (TypeError, ValueError, KeyError):
                continue
            if all(row.get(k) is not None for k in require):
                rows.append(row)
    return rows


def steady_throughput(rows: list[dict], skip: int) -> dict | None:
    """Tokens/s over the steps after `skip` (warm-up): sum(tokens) / sum(step seconds). With `skip` steps or
    fewer logged, the second half of the logged steps is used and `warmup_excluded` is False."""
    if not rows:
        return None
    steps, previous = [], None
    for row in rows:  # tokens is cumulative; before the first logged row `step` equal steps were taken
        done = row["step"] - (previous["step"] if previous else 0)
        tokens = (row["tokens"] - previous["tokens"]) / done if previous else row["tokens"] / row["step"]
        steps.append((row["step"], tokens, tokens / row["tokens_per_s"]))
        previous = row
    used = [s for s in steps if s[0] > skip]
    excluded = bool(used)
    if not used:
        used = steps[len(steps) // 2 :]
    seconds = [s[2] for s in used]
    return {"tokens_per_s": sum(s[1] for s in used) / sum(seconds), "step_ms_median": statistics.median(seconds) * 1e3,
            "steps_used": [used[0][0], used[-1][0]], "warmup_excluded": excluded}  # fmt: skip


# ----------------------------------------------------------------------------------------------- writing


def fmt(value, spec: str = ",.2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec == "%":
        return f"{value:.2%}"
    if spec == "x":
        return f"{value:,.2f}x"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown_table(rows: list[dict], index: list[tuple], values: list[tuple], series: str | None = None) -> str:
    """One row per distinct `index` tuple; columns: the index keys, then per value (key, label, spec) one column,
    or with `series` one column per series value (e.g. ours | SDPA | 0.1.9) that has it. A failed case shows its
    error in its series' first column."""
    names = list(dict.fromkeys(r.get(series) for r in rows)) if series else [None]
    of = {name: [r for r in rows if not series or r.get(series) == name] for name in names}
    cols = [(key, f"{name} {label}" if series else label, spec, name) for key, label, spec in values
            for name in names if key == values[0][0] or any(r.get(key) is not None for r in of[name])]  # fmt: skip
    first = {name: next((c for c in cols if c[3] == name), None) for name in names}
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k, _, _ in index), {})[r.get(series) if series else None] = r
    header = [label for _, label, _ in index] + [c[1] for c in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, members in groups.items():
        cells = [fmt(v, spec) for v, (_, _, spec) in zip(key, index)]
        for col in cols:
            r = members.get(col[3], {})
            failed = "error" in r and (col is first[col[3]])
            cells.append(f"error: {r['error'][:80]}" if failed else "-" if "error" in r else fmt(r.get(col[0]), col[2]))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def plot_lines(path: Path, rows: list[dict], x: str, y: str, series: str | None, panels: list[str],
               title: str, log: bool = True) -> None:  # fmt: skip
    """y against x, one line per series value, one panel per distinct value of the `panels` keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get(y) is not None and r.get(x) is not None]
    keys = list(dict.fromkeys(tuple(r.get(p) for p in panels) for r in ok)) or [()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 3.8), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        panel = [r for r in ok if tuple(r.get(p) for p in panels) == key]
        for name in dict.fromkeys(r.get(series) for r in panel) if series else [None]:
            line = sorted((r[x], r[y]) for r in panel if not series or r.get(series) == name)
            ax.plot(*zip(*line), "o-", label=str(name) if series else None, ms=3)
        if log and all(isinstance(r[x], (int, float)) and r[x] > 0 for r in panel):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
        ax.set(xlabel=x, ylabel=y, title=", ".join(f"{p} {v}" for p, v in zip(panels, key)))
        ax.grid(alpha=0.3)
        if series and panel:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def env_line(env: dict) -> str:
    return (f"Card: **{env['card']}**; torch {env['torch']}; triton {env['triton']}; Python {env['python']}; "
            f"{env['cpu_count']} CPUs, {env['threads']} torch threads; malloc {env['malloc']}; {env['date']}.")
