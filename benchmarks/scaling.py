"""Data-parallel scaling of the training CLI: tokens/s on 1, 2, 4 GPUs and the scaling efficiency.

    PYTHONPATH=. python benchmarks/scaling.py [--gpus 1 2 4] [--preset base] [--max-steps 30] ...
    PYTHONPATH=. python benchmarks/scaling.py --device cpu --quick        # smoke run: gloo, 1 and 2 processes

For every K in --gpus (a K above the number of visible GPUs is skipped), in increasing order, it runs

    python -m torch.distributed.run --standalone --nproc_per_node K -m h_transformer_1d train \\
        --preset P --batch-size K*B --max-steps S --eval-every S --eval-batches 1 --sample-every 0 ...

into --runs-dir/kK: the same per-GPU micro-batch B (so the global batch grows with K: weak scaling), DDP,
the default corpus. `train` writes one metrics.csv row per optimizer step whose `tokens_per_s` is the
global batch divided by process 0's wall time of that step: the time between two reads of the loss,
shared among the steps read (the loop reads a step's loss once the next step's data, forward, backward,
gradient all-reduce and optimizer are queued, through a CUDA event on a GPU); evaluation and checkpoint
writing fall outside it. The steady-state tokens/s of a run is sum(tokens) / sum(step time)
over the steps after --skip-steps (warm-up: CUDA and Triton initialisation, DDP bucket building,
the allocator); the efficiency is tokens/s(K) / (K x tokens/s(1)).

Writes --out-dir/scaling.{md,json,png} after every run, so a run killed by a time limit still leaves the
runs before it reported; --report-only rewrites them from --runs-dir. --time-budget bounds the whole
script: a run that would start with too little time left is skipped, one that runs past its share is
stopped and reported from the steps it logged.

quality.py imports the helpers of this file (environment, process handling, metrics.csv parsing).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# NVLink multicast stays off wherever these scripts start NCCL programs (a program that uses it can put
# a shared host's GPUs out of service); the values are forced, not defaulted.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

# the --quick model: small enough for a few CPU seconds per run, big enough that a step is not all overhead
QUICK_MODEL = ["--dim", "64", "--depth", "2", "--heads", "2", "--dim-head", "32", "--block-size", "16"]


# ----------------------------------------------------------------------------------------------------
# helpers shared with quality.py
# ----------------------------------------------------------------------------------------------------


class Stop(Exception):
    """SIGTERM / SIGINT to this script: stop the runs, write what there is."""


def install_stop_handlers() -> None:
    def handler(signum, frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def git_revision() -> str:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO_ROOT), *args], check=False, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    sha = git("rev-parse", "--short=12", "HEAD")
    if not sha:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return sha + (" (with uncommitted changes)" if dirty else "")


def gpu_names() -> list[str]:
    """Names of the GPUs this process may use (CUDA_VISIBLE_DEVICES respected), without touching CUDA."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    cards = {}
    for line in out.stdout.strip().splitlines():
        index, _, rest = line.partition(",")
        cards[index.strip()] = rest.strip().replace(", ", ", ")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(cards.values())
    entries = [i.strip() for i in visible.split(",") if i.strip()]
    if all(i in cards for i in entries):
        return [cards[i] for i in entries]
    return list(cards.values())[: len(entries)]  # UUIDs or MIG names: the count is right, the names a guess


def gpu_count() -> int:
    names = gpu_names()
    if names:
        return len(names)
    try:
        import torch

        return torch.cuda.device_count()  # does not create a CUDA context
    except (ImportError, RuntimeError):
        return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict:
    cards = gpu_names() if device != "cpu" else []
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": device,
        "card": cards[0] if cards else (f"CPU: {cpu_model()}" if device == "cpu" else "unknown"),
        "cards": cards,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": package_version("torch") or "unknown",
        "triton": package_version("triton", "pytorch-triton") or "not installed",
        "git": git_revision(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


# substrings of the CUDA kernels of SDPA's fused backends (cuDNN, flash, memory-efficient)
SDPA_KERNEL_MARKS = ("sdpa", "flash", "fmha", "attention", "attn")


def sdpa_backend_of(kernels: list[str]) -> str:
    """SDPA's backend named from the attention kernels one call launched (empty: the math backend, which
    runs as matmuls and a softmax)."""
    lower = " ".join(kernels).lower()
    if not kernels:
        return "math"
    if "cudnn" in lower:
        return "cuDNN attention"
    if "flash" in lower:
        return "flash attention"
    if "fmha" in lower or "cutlass" in lower or "efficient" in lower:
        return "memory-efficient attention"
    return "other"


def sdpa_kernels(batch: int, heads: int, seq_len: int, dim_head: int, causal: bool = True) -> dict:
    """Which SDPA backend a dense run uses: the CUDA kernels that one bf16 forward and backward of
    scaled_dot_product_attention launches at this shape (torch.profiler), as the model calls it (q, k, v
    of shape batch x heads x seq_len x dim_head, is_causal). {"backend", "kernels", "shape"}."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (
        torch.randn(batch, heads, seq_len, dim_head, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa(q, k, v, is_causal=causal).sum().backward()  # warm-up: backend choice and cuDNN plans outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sdpa(q, k, v, is_causal=causal).sum().backward()
        torch.cuda.synchronize()
    names = sorted({
        e.name for e in prof.events()
        if e.device_type == DeviceType.CUDA and any(m in e.name.lower() for m in SDPA_KERNEL_MARKS)
    })  # fmt: skip
    return {"backend": sdpa_backend_of(names), "kernels": names,
            "shape": f"{batch}x{heads}x{seq_len}x{dim_head} bf16{' causal' if causal else ''}"}  # fmt: skip


def sdpa_kernels_or_error(batch: int, heads: int, seq_len: int, dim_head: int, causal: bool = True) -> dict:
    """sdpa_kernels in this process; {"error": ...} if it fails (a study records that and goes on)."""
    try:
        return sdpa_kernels(batch, heads, seq_len, dim_head, causal)
    except Exception as error:  # noqa: BLE001 (no study depends on the probe)
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def sdpa_kernels_in_child(
    batch: int, heads: int, seq_len: int, dim_head: int, causal: bool = True, env: dict | None = None
) -> dict:
    """sdpa_kernels in a child process (environment: child_env(env), e.g. the run's CUDA_VISIBLE_DEVICES), so
    that this one makes no CUDA context; {"error": ...} if it fails."""
    shape = json.dumps([batch, heads, seq_len, dim_head, causal])
    code = (
        "import json, sys; from scaling import sdpa_kernels; print(json.dumps(sdpa_kernels(*json.loads(sys.argv[1]))))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", code, shape], cwd=BENCH_DIR, env=child_env(env),
                             capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def sdpa_line(probe: dict | None) -> str:
    """The report's line about sdpa_kernels' result."""
    if not probe:
        return "SDPA backend: not recorded."
    if "error" in probe:
        return f"SDPA backend: not recorded ({probe['error']})."
    kernels = ", ".join(f"`{k[:90]}`" for k in probe["kernels"]) or "none of the fused backends'"
    return (f"SDPA backend (dense attention): **{probe['backend']}**; kernels of one forward and backward at "
            f"{probe['shape']}: {kernels}.")  # fmt: skip


def child_env(extra: dict | None = None) -> dict:
    """The environment of a training process: ours, the repository on PYTHONPATH, multicast off."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(SAFE_ENV)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Job:
    """One command in its own session, stdout and stderr to a log file."""

    def __init__(self, command: list[str], log: Path, env: dict, cwd: Path = REPO_ROOT):
        self.command, self.log_path = command, log
        self.started = time.monotonic()
        self.stopped_by: str | None = None
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "w")  # noqa: SIM115 (open while the job runs, closed by poll)
        self._log.write("$ " + shlex.join(command) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self._log.closed:
            self._log.close()
        return rc

    def wait(self, timeout: float | None) -> int | None:
        """The exit status, or None if it still runs after `timeout` seconds."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.poll()

    def stop(self, why: str, grace: float = 30.0) -> int:
        """SIGINT (train exits cleanly, torchrun passes SIGTERM to its workers), then SIGKILL what is left."""
        if self.poll() is not None:
            return self.proc.returncode
        self.stopped_by = why
        family = descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        rc = self.wait(grace)
        for pid in [self.proc.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if rc is None:
            rc = self.wait(10)
        return rc if rc is not None else -9

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv rows as numbers (None for an empty cell); a row cut short by a kill is dropped."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            try:
                row = {k: (float(v) if v not in ("", None) else None) for k, v in raw.items() if k is not None}
                row["step"] = int(row["step"])
                if row.get("tokens") is None or row.get("tokens_per_s") is None:
                    continue
            except (TypeError, ValueError, KeyError):
                continue
            rows.append(row)
    return rows


def steady_throughput(rows: list[dict], skip: int) -> dict | None:
    """Tokens/s over the steps after `skip`: sum(tokens) / sum(step seconds), and the per-step median.

    With `skip` steps or fewer logged (a run stopped early), the second half of the logged steps is used
    and `warmup_excluded` is False.
    """
    if not rows:
        return None
    previous, steps = None, []
    for row in rows:
        # tokens is cumulative; before the first logged row, `step` steps of equal size were taken
        tokens = row["tokens"] - previous["tokens"] if previous else row["tokens"] / row["step"]
        if row["tokens_per_s"] > 0 and tokens > 0:
            steps.append((row["step"], tokens, tokens / row["tokens_per_s"], row["tokens_per_s"]))
        previous = row
    kept = [s for s in steps if s[0] > skip]
    warmup_excluded = bool(kept)
    if not kept:
        kept = steps[len(steps) // 2 :]
    if not kept:
        return None
    seconds = [s[2] for s in kept]
    return {
        "tokens_per_s": sum(s[1] for s in kept) / sum(seconds),
        "median_tokens_per_s": statistics.median(s[3] for s in kept),
        "step_ms_median": statistics.median(seconds) * 1e3,
        "step_ms_min": min(seconds) * 1e3,
        "step_ms_max": max(seconds) * 1e3,
        "tokens_per_step": kept[-1][1],
        "steps_used": [kept[0][0], kept[-1][0]],
        "n_steps": len(kept),
        "warmup_excluded": warmup_excluded,
    }


def parse_train_log(text: str) -> dict:
    """What `train` prints about itself: parameters, processes, device and precision."""
    info = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("model: ") and "parameters" in line:
            try:
                info["params_m"] = float(line.split()[1].rstrip("M"))
            except (IndexError, ValueError):
                pass
            info["model"] = line[len("model: ") :]
        elif line.startswith("training: ") and "process(es)" in line:
            info["training"] = line[len("training: ") :]
            try:
                info["processes"] = int(line.split()[1])
            except (IndexError, ValueError):
                pass
            found = re.search(r"process\(es\) on (\S+) \(([^)]*)\)", line)
            if found:
                info["device"], info["precision"] = found.groups()
        elif line.startswith("data: "):
            info["data"] = line[len("data: ") :]
    return info


def read_run_config(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return None


def fresh_run_dir(path: Path) -> None:
    """Remove an earlier run of this study at `path` (`train` refuses a directory with a checkpoint)."""
    if not path.exists():
        return
    looks_like_run = any((path / name).exists() for name in ("metrics.csv", "config.json", "train.log"))
    if not looks_like_run and any(path.iterdir()):
        raise SystemExit(f"{path} exists and does not look like a training run of this script: not removing it")
    shutil.rmtree(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically (a temporary file, then rename) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    os.replace(tmp, path)


def kernel_bench_out_dir(parser, args) -> Path:
    """For the kernel micro-benchmarks (--device, --quick, --out-dir): refuse --device cuda without a
    CUDA device; the results folder, made (default results/, with --quick results/quick/)."""
    import torch

    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (on a CPU: TRITON_INTERPRET=1 ... --quick --device cpu)")
    out_dir = args.out_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def fmt(value, spec: str = ",.0f", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def display_command(command: list[str], env: dict | None = None) -> str:
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    text = shlex.join(command)
    return f"{prefix} {text}" if prefix else text


def script_command() -> str:
    """How this script was started, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join(["PYTHONPATH=.", "python", str(script), *sys.argv[1:]]).replace("'PYTHONPATH=.'", "PYTHONPATH=.")


# ----------------------------------------------------------------------------------------------------
# the scaling study
# ----------------------------------------------------------------------------------------------------


def train_command(args, k: int, out: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k)]
    command = [*launcher, "-m", "h_transformer_1d", "train", "--preset", args.preset]
    if args.quick:
        command += QUICK_MODEL
    if args.seq_len:
        command += ["--seq-len", str(args.seq_len)]
    command += [
        "--batch-size", str(k * args.batch_size),
        "--max-steps", str(args.max_steps),
        "--eval-every", str(args.max_steps),  # one evaluation, at the end (train always evaluates the last step)
        "--eval-batches", "1",
        "--sample-every", "0",
        "--device", args.device,
    ]  # fmt: skip
    for extra in args.extra:
        command += shlex.split(extra)
    return command + ["--out", str(relative(out))]


def relative(path: Path) -> Path:
    """`path` relative to the repository root (the runs' working directory) when it lies inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        return path.resolve()


def run_dir_for(runs_dir: Path, k: int) -> Path:
    return runs_dir / f"k{k}"


def collect(runs_dir: Path, study: dict, skip: int) -> list[dict]:
    """One result row per requested K, from the run directories and the study's status records."""
    rows = []
    for k in study["gpus"]:
        status = study["runs"].get(str(k), {})
        row = {"k": k, "status": status.get("status", "not run"), "command": status.get("command")}
        for key in ("rc", "wall_s", "stopped_by", "note"):
            if key in status:
                row[key] = status[key]
        run_dir = run_dir_for(runs_dir, k)
        # a K this study skipped or never reached may have a directory of an earlier study: not read
        metrics = read_metrics(run_dir) if row["status"] not in ("skipped", "not run") else []
        if metrics:
            log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
            row["log"] = parse_train_log(log)
            row["config"] = read_run_config(run_dir)
            row["steps_logged"] = metrics[-1]["step"]
            row["throughput"] = steady_throughput(metrics, skip)
            row["per_step_tokens_per_s"] = [[m["step"], m["tokens_per_s"]] for m in metrics]
            if row["log"].get("processes") not in (None, k):
                row["note"] = f"train reported {row['log']['processes']} processes, expected {k}"
        rows.append(row)
    base = next((r for r in rows if r["k"] == 1 and r.get("throughput")), None)
    for row in rows:
        if row.get("throughput"):
            tps = row["throughput"]["tokens_per_s"]
            row["tokens_per_s"] = tps
            row["tokens_per_s_per_gpu"] = tps / row["k"]
            if base:
                one = base["throughput"]["tokens_per_s"]
                row["speedup"] = tps / one
                row["efficiency"] = tps / (row["k"] * one)
    return rows


def report(out_dir: Path, runs_dir: Path, study: dict, skip: int) -> dict:
    rows = collect(runs_dir, study, skip)
    env, cfg = study["env"], study["settings"]
    unit, units = ("GPU", "GPUs") if env["device"] != "cpu" else ("process", "processes")
    result = {"env": env, "settings": cfg, "command": study.get("command"), "results": rows}
    write_json(out_dir / "scaling.json", result)

    first = next((r for r in rows if r.get("config")), None)
    model = first["log"].get("model", "") if first else ""
    precision = first["log"].get("precision", "") if first else ""
    lines = [
        "# Data-parallel scaling of `h_transformer_1d train`",
        "",
        f"Card: **{env['card']}**"
        + (f" (x{len(env['cards'])} visible)" if env.get("cards") else "")
        + f"; torch {env['torch']}; triton {env['triton']}; Python {env['python']}; git {env['git']}; "
        f"host {env['host']}, {env['cpu_count']} CPUs; {env['date']}.",
        "",
        (
            f"Model: {model or '(no run finished its first step)'}; {precision}. Preset `{cfg['preset']}`, "
            f"{cfg['batch_size']} sequences per {unit} per step (global batch = K x {cfg['batch_size']}), "
            f"{cfg['max_steps']} steps, DDP through `torch.distributed.run` "
            f"({'NCCL' if env['device'] != 'cpu' else 'gloo'}), default corpus unless `--data` is in the extra arguments."
        ),
        (
            f"tokens/s = sum(tokens) / sum(step time) over steps {skip + 1}..{cfg['max_steps']} "
            f"(the first {skip} are warm-up); step time is process 0's wall time of one optimizer step "
            "(metrics.csv `tokens_per_s`), evaluation and checkpoints excluded. "
            "Efficiency = tokens/s(K) / (K x tokens/s(1))."
        ),
        "",
        (
            f"| {units} K | global batch | status | tokens/s | tokens/s per {unit} | speedup | efficiency "
            "| median step ms (min-max) | steps used |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("throughput")
        if t:
            step_ms = f"{t['step_ms_median']:.1f} ({t['step_ms_min']:.1f}-{t['step_ms_max']:.1f})"
            used = f"{t['steps_used'][0]}-{t['steps_used'][1]}" + ("" if t["warmup_excluded"] else " (warm-up incl.)")
            eff = fmt(r.get("efficiency"), ".1%")
            lines.append(
                f"| {r['k']} | {r['k'] * cfg['batch_size']} | {r['status']} | {fmt(t['tokens_per_s'])} | "
                f"{fmt(r['tokens_per_s_per_gpu'])} | {fmt(r.get('speedup'), '.2f')}x | {eff} | {step_ms} | {used} |"
            )
        else:
            lines.append(f"| {r['k']} | {r['k'] * cfg['batch_size']} | {r['status']} | - | - | - | - | - | - |")
    notes = [f"- K={r['k']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- K={r['k']}: stopped ({r['stopped_by']}); reported from the steps it logged" for r in rows
              if r.get("stopped_by")]  # fmt: skip
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += ["", "## Commands", "", "The study:", "", "```", study.get("command") or "(unknown)", "```", ""]
    if study.get("report_command"):
        lines += ["This report, re-made from the run directories:", "", "```", study["report_command"], "```", ""]
    lines += ["Training runs (from the repository root):", "", "```"]
    lines += [r["command"] for r in rows if r.get("command")]
    lines += ["```", ""]
    write_text(out_dir / "scaling.md", "\n".join(lines))

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    done = [r for r in rows if r.get("tokens_per_s")]
    if done:
        ks = [r["k"] for r in done]
        ax1.plot(ks, [r["tokens_per_s"] for r in done], "o-", label="measured")
        base = next((r for r in done if r["k"] == 1), None)
        if base:
            ideal = [base["tokens_per_s"] * k for k in ks]
            ax1.plot(ks, ideal, "--", color="gray", label="ideal (K x one)")
            eff = [(r["k"], r["efficiency"]) for r in done if "efficiency" in r]
            ax2.plot(*zip(*eff), "o-", color="tab:green")
            for k, e in eff:
                ax2.annotate(f"{e:.0%}", (k, e), textcoords="offset points", xytext=(4, 6))
        ax1.set_xticks(ks)
        ax2.set_xticks(ks)
    ax1.set(xlabel=f"{units} K", ylabel="tokens/s (global)", title="training throughput")
    if done:
        ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.axhline(1.0, color="gray", linestyle="--")
    ax2.set(
        xlabel=f"{units} K",
        ylabel="efficiency",
        title="scaling efficiency = tok/s(K) / (K x tok/s(1))",
        ylim=(0, max([1.15] + [r["efficiency"] * 1.1 for r in done if "efficiency" in r])),
    )
    ax2.grid(alpha=0.3)
    fig.suptitle(
        f"{env['card']}, torch {env['torch']}: preset {cfg['preset']}, {cfg['batch_size']} seq per {unit}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png")
    plt.close(fig)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", help="process counts K (default: 1 2 4; --quick: 1 2)")
    parser.add_argument("--preset", help="train --preset (default: base; --quick: tiny with a small model)")
    parser.add_argument("--seq-len", type=int, help="train --seq-len (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per GPU (process) per step (default: 8; --quick: 4)")
    parser.add_argument("--max-steps", type=int, help="steps per run (default: 30; --quick: 10)")
    parser.add_argument("--skip-steps", type=int, help="warm-up steps left out of tokens/s (default: 10; --quick: 4)")
    parser.add_argument("--extra", action="append", default=[], metavar="ARGS",
                        help="more train arguments, one quoted string (repeatable), e.g. --extra '--compile'")  # fmt: skip
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), help="cuda (NCCL) or cpu (gloo) (default: cuda; --quick: cpu)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, K in 1 2")
    parser.add_argument(
        "--out-dir", type=Path, help="report directory (default: benchmarks/results; --quick: results/quick)"
    )
    parser.add_argument("--runs-dir", type=Path, help="training output directories (default: runs/scaling[_quick])")
    parser.add_argument("--time-budget", type=float, default=540.0,
                        help="seconds for the whole script: runs that would start with less than --min-run-seconds left "
                        "are skipped, a run past its share is stopped (default: 540)")  # fmt: skip
    parser.add_argument("--min-run-seconds", type=float, help="see --time-budget (default: 45; --quick: 5)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process on the CPU (default: 1)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --runs-dir, train nothing")
    args = parser.parse_args()

    quick = args.quick
    args.gpus = sorted(set(args.gpus or ([1, 2] if quick else [1, 2, 4])))
    args.preset = args.preset or ("tiny" if quick else "base")
    args.batch_size = args.batch_size or (4 if quick else 8)
    args.max_steps = args.max_steps or (10 if quick else 30)
    args.skip_steps = args.skip_steps if args.skip_steps is not None else (4 if quick else 10)
    args.device = args.device or ("cpu" if quick else "cuda")
    if args.min_run_seconds is None:
        args.min_run_seconds = 5.0 if quick else 45.0
    if quick and args.seq_len is None:
        args.seq_len = 128
    out_dir = args.out_dir or (RESULTS_DIR / "quick" if quick else RESULTS_DIR)
    runs_dir = (args.runs_dir or REPO_ROOT / "runs" / ("scaling_quick" if quick else "scaling")).resolve()
    if min(args.gpus) < 1 or args.max_steps < 1 or args.batch_size < 1:
        parser.error("--gpus, --max-steps and --batch-size must be positive")

    study_file = runs_dir / "study.json"
    if args.report_only:
        try:
            study = json.loads(study_file.read_text())
        except (OSError, ValueError):
            parser.error(f"--report-only: no readable {study_file}")
        skip = args.skip_steps if "--skip-steps" in sys.argv else study["settings"]["skip_steps"]
        study["report_command"] = script_command()
        for status in study["runs"].values():  # the study script itself was killed while it ran
            if status.get("status") == "running":
                status["status"] = "interrupted"
        report(out_dir, runs_dir, study, skip)
        print((out_dir / "scaling.md").read_text())
        return 0

    deadline = time.monotonic() + args.time_budget
    install_stop_handlers()
    env = environment(args.device)
    available = gpu_count() if args.device == "cuda" else None
    study = {
        "env": env,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "runs_dir", "report_only")},
        "command": script_command(),
        "gpus": args.gpus,
        "runs": {},
    }
    study["settings"]["available_gpus"] = available
    runs_dir.mkdir(parents=True, exist_ok=True)
    extra_env = {}
    if args.device == "cpu":
        extra_env["OMP_NUM_THREADS"] = str(args.threads or 1)
    print(
        f"scaling: {env['card']}, torch {env['torch']}, K in {args.gpus} -> {runs_dir}, report in {out_dir}", flush=True
    )

    def save() -> None:
        write_json(study_file, study)
        report(out_dir, runs_dir, study, args.skip_steps)

    job = None
    try:
        for i, k in enumerate(args.gpus):
            run_dir = run_dir_for(runs_dir, k)
            command = train_command(args, k, run_dir)
            status = study["runs"][str(k)] = {"command": "PYTHONPATH=. python " + shlex.join(command[1:])}
            if available is not None and k > available:
                status.update(status="skipped", note=f"only {available} GPU(s) visible")
                print(f"K={k}: skipped, only {available} GPU(s) visible", flush=True)
                save()
                continue
            left = deadline - time.monotonic()
            if left < args.min_run_seconds:
                status.update(status="skipped", note=f"time budget: {left:.0f} s left")
                print(f"K={k}: skipped, {left:.0f} s of the time budget left", flush=True)
                save()
                continue
            runs_left = sum(1 for kk in args.gpus[i:] if available is None or kk <= available)
            share = left if runs_left <= 1 else max(args.min_run_seconds, left / runs_left * 1.5)
            share = min(share, left)
            fresh_run_dir(run_dir)
            print(f"K={k}: {status['command']}  (at most {share:.0f} s)", flush=True)
            job = Job(command, run_dir / "train.log", child_env(extra_env))
            status["status"] = "running"
            save()
            rc = job.wait(max(1.0, share - min(15.0, share / 5)))  # leave time to stop it
            if rc is None:
                rc = job.stop(f"time share of {share:.0f} s used up", grace=10)
            status.update(rc=rc, wall_s=round(job.seconds, 1))
            if job.stopped_by:
                status.update(status="stopped", stopped_by=job.stopped_by)
            else:
                status["status"] = "done" if rc == 0 else f"failed (exit {rc})"
            if rc != 0:
                print(job.tail(), file=sys.stderr)
            save()
            t = steady_throughput(read_metrics(run_dir), args.skip_steps)
            print(f"K={k}: {status['status']} in {job.seconds:.0f} s"
                  + (f", {t['tokens_per_s']:,.0f} tokens/s" if t else ""), flush=True)  # fmt: skip
    except Stop as e:
        for status in study["runs"].values():
            if status.get("status") == "running":
                status.update(status="stopped", stopped_by=f"script received {e}")
        if job is not None:
            job.stop(f"script received {e}", grace=10)
        save()
        print(f"scaling: stopped by {e}; partial report in {out_dir}", file=sys.stderr)
        return 1
    save()
    print((out_dir / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
