"""Hierarchical vs dense attention in the same model: validation bits per byte and training tokens/s.

    PYTHONPATH=. python benchmarks/quality.py --parallel                # two GPUs, one run on each
    PYTHONPATH=. python benchmarks/quality.py --report-only --runs DIR  # report existing runs, train nothing
    PYTHONPATH=. python benchmarks/quality.py --device cpu --quick      # smoke run, a few CPU seconds

Runs `python -m h_transformer_1d train` twice with the same settings (model, context, batch, steps,
learning-rate schedule, seed, hence the same initial weights and the same batches) except
`--attention hierarchical` / `--attention dense` (exact attention through SDPA), into --runs/hierarchical
and --runs/dense. With --parallel both run at once, on CUDA_VISIBLE_DEVICES --gpu-ids[0] and [1]; otherwise
one after the other. After a run finishes, `h_transformer_1d evaluate --split val` scores its final
checkpoint on the whole validation split (--full-eval-batches to cut it).

The target it checks (the issue): hierarchical within 3% of dense in validation bits per byte, at 1.5x
dense's training tokens/s or more. Bits per byte are compared at the last evaluation both runs reached
(the same step, so the same tokens seen: a run stopped by --time-limit is reported from its last
evaluation); tokens/s is sum(tokens) / sum(step time) over the logged steps after --skip-steps
(metrics.csv `tokens_per_s`: the wall time between two reads of the loss, shared among the steps read;
the loop reads a step's loss once the next step is queued; evaluations, samples and checkpoints excluded).

Writes --out-dir/quality.{md,json,png} every --report-every seconds while the runs go and at the end,
so a script killed by a time limit leaves a report of what the runs logged; --report-only rewrites
it from --runs (the settings and commands come from --runs/study.json when it is there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from scaling import (
    QUICK_MODEL,
    REPO_ROOT,
    RESULTS_DIR,
    Job,
    Stop,
    child_env,
    environment,
    fmt,
    fresh_run_dir,
    gpu_count,
    gpu_names,
    install_stop_handlers,
    parse_train_log,
    pyplot,
    read_metrics,
    read_run_config,
    relative,
    script_command,
    sdpa_kernels_in_child,
    sdpa_line,
    steady_throughput,
    write_json,
    write_text,
)

KINDS = ("hierarchical", "dense")
BPB_TARGET_PCT = 3.0  # hierarchical at most 3% above dense in bits per byte
SPEED_TARGET = 1.5  # hierarchical at least 1.5x dense's training tokens/s
FULL_EVAL_FILE = "full_eval.json"

DEFAULTS = {  # GPU study
    "preset": "base",
    "seq_len": 4096,
    "batch_size": 8,
    "max_steps": 400,
    "warmup_steps": 40,
    "lr": 1e-3,
    "eval_every": 50,
    "eval_batches": 8,
    "skip_steps": 20,
    "full_eval_batches": 0,
}
QUICK = {  # CPU smoke run
    "preset": "tiny",
    "seq_len": 128,
    "batch_size": 4,
    "max_steps": 8,
    "warmup_steps": 2,
    "lr": 2e-3,
    "eval_every": 4,
    "eval_batches": 1,
    "skip_steps": 3,
    "full_eval_batches": 2,
}


def train_command(args, kind: str, out: Path) -> list[str]:
    command = [sys.executable, "-m", "h_transformer_1d", "train", "--preset", args.preset]
    if args.quick:
        command += QUICK_MODEL
    command += [
        "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size),
        "--max-steps", str(args.max_steps),
        "--warmup-steps", str(args.warmup_steps),
        "--lr", str(args.lr),
        "--eval-every", str(args.eval_every),
        "--eval-batches", str(args.eval_batches),
        "--sample-every", "0",
        "--seed", str(args.seed),
        "--device", args.device,
    ]  # fmt: skip
    for extra in args.extra:
        command += shlex.split(extra)
    return command + ["--attention", kind, "--out", str(relative(out))]


def eval_command(args, out: Path) -> list[str]:
    command = [sys.executable, "-m", "h_transformer_1d", "evaluate", "--checkpoint", str(relative(out)),
               "--split", "val", "--device", args.device]  # fmt: skip
    if args.full_eval_batches:
        command += ["--max-batches", str(args.full_eval_batches)]
    return command


def shown(command: list[str], env: dict) -> str:
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    return f"{prefix}PYTHONPATH=. python " + shlex.join(command[1:])


def parse_full_eval(text: str) -> dict | None:
    bpb = re.search(r"val bits per byte: ([0-9.]+)", text)
    if not bpb:
        return None
    out = {"bpb": float(bpb.group(1))}
    detail = re.search(
        r"\(([\d,]+) windows of (\d+) bytes = ([\d,]+) predicted bytes of ([\d,]+);.* at step (\d+)", text
    )
    if detail:
        windows, _, predicted, total, step = detail.groups()
        out.update(windows=int(windows.replace(",", "")), predicted_bytes=int(predicted.replace(",", "")),
                   split_bytes=int(total.replace(",", "")), step=int(step))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------


def collect_run(run_dir: Path, skip: int) -> dict:
    metrics = read_metrics(run_dir)
    log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    evals = [(m["step"], m["tokens"], m["val_bpb"]) for m in metrics if m.get("val_bpb") is not None]
    run = {
        "dir": str(run_dir),
        "log": parse_train_log(log),
        "config": read_run_config(run_dir),
        "steps_logged": metrics[-1]["step"] if metrics else 0,
        "tokens_seen": metrics[-1]["tokens"] if metrics else 0,
        "elapsed_s": metrics[-1].get("elapsed_s") if metrics else None,
        "evals": [{"step": s, "tokens": t, "val_bpb": v} for s, t, v in evals],
        "throughput": steady_throughput(metrics, skip),
        "train": [[m["step"], m["tokens"], m["train_bpb"], m["tokens_per_s"]] for m in metrics],
    }
    try:
        run["full_eval"] = json.loads((run_dir / FULL_EVAL_FILE).read_text())
    except (OSError, ValueError):
        pass
    return run


def pct(a: float | None, b: float | None) -> float | None:
    return (a / b - 1) * 100 if a is not None and b else None


def compare(runs: dict) -> dict:
    hier, dense = runs["hierarchical"], runs["dense"]
    h_evals = {e["step"]: e for e in hier["evals"]}
    d_evals = {e["step"]: e for e in dense["evals"]}
    common = sorted(set(h_evals) & set(d_evals))
    out: dict = {"common_steps": common}
    if common:
        s = common[-1]
        h, d = h_evals[s], d_evals[s]
        out["at"] = {"step": s, "tokens": h["tokens"], "tokens_dense": d["tokens"], "hierarchical": h["val_bpb"],
                     "dense": d["val_bpb"], "diff_pct": pct(h["val_bpb"], d["val_bpb"])}  # fmt: skip
        h_best = min((h_evals[c] for c in common), key=lambda e: e["val_bpb"])
        d_best = min((d_evals[c] for c in common), key=lambda e: e["val_bpb"])
        out["best"] = {"hierarchical": h_best["val_bpb"], "hierarchical_step": h_best["step"], "dense": d_best["val_bpb"],
                       "dense_step": d_best["step"], "diff_pct": pct(h_best["val_bpb"], d_best["val_bpb"])}  # fmt: skip
        out["bpb_ok"] = out["at"]["diff_pct"] <= BPB_TARGET_PCT
    hf, df = hier.get("full_eval"), dense.get("full_eval")
    if hf and df:
        out["full_eval"] = {"hierarchical": hf["bpb"], "dense": df["bpb"], "diff_pct": pct(hf["bpb"], df["bpb"]),
                            "same_step": hf.get("step") == df.get("step"), "step": hf.get("step")}  # fmt: skip
    ht, dt = hier.get("throughput"), dense.get("throughput")
    if ht and dt:
        out["speed_ratio"] = ht["tokens_per_s"] / dt["tokens_per_s"]
        out["speed_ok"] = out["speed_ratio"] >= SPEED_TARGET
    if "bpb_ok" in out and "speed_ok" in out:
        out["target_met"] = out["bpb_ok"] and out["speed_ok"]
    return out


def mark(ok: bool | None) -> str:
    return "-" if ok is None else ("✓" if ok else "✗")


def report(out_dir: Path, runs_dir: Path, study: dict) -> dict:
    skip = study["settings"]["skip_steps"]
    runs = {kind: collect_run(runs_dir / kind, skip) for kind in KINDS}
    for kind in KINDS:
        runs[kind]["status"] = study["runs"].get(kind, {})
    cmp = compare(runs)
    env, cfg = study["env"], study["settings"]
    result = {"env": env, "settings": cfg, "command": study.get("command"), "comparison": cmp, "runs": runs}
    write_json(out_dir / "quality.json", result)

    h, d = runs["hierarchical"], runs["dense"]
    model = h["log"].get("model") or d["log"].get("model") or "(no run has started)"
    model = re.sub(r", (hierarchical|dense) attention", "", model)
    precision = h["log"].get("precision") or d["log"].get("precision") or "?"
    params = {kind: runs[kind]["log"].get("params_m") for kind in KINDS}
    tokens_per_step = cfg["batch_size"] * cfg["seq_len"]
    budget = tokens_per_step * cfg["max_steps"]
    cards = {kind: study["runs"].get(kind, {}).get("card") for kind in KINDS}
    card_text = (
        env["card"] if len(set(cards.values()) - {None}) <= 1 else ", ".join(f"{k}: {v}" for k, v in cards.items())
    )
    at, best, full = cmp.get("at"), cmp.get("best"), cmp.get("full_eval")
    ht, dt = h.get("throughput"), d.get("throughput")

    if "target_met" in cmp:
        verdict = "**met**" if cmp["target_met"] else "**not met**"
        headline = (f"Target (within {BPB_TARGET_PCT:g}% of dense in bits per byte at {SPEED_TARGET:g}x its training "
                    f"speed or more): {verdict}. Bits per byte {at['diff_pct']:+.2f}% {mark(cmp['bpb_ok'])}, "
                    f"speed {cmp['speed_ratio']:.2f}x {mark(cmp['speed_ok'])}.")  # fmt: skip
    else:
        headline = "Target not evaluated yet: the runs have no common evaluation or no timed steps."
    incomplete = [k for k in KINDS if runs[k]["steps_logged"] < cfg["max_steps"]]
    if incomplete:
        headline += f" Runs not at --max-steps {cfg['max_steps']}: " + ", ".join(
            f"{k} (step {runs[k]['steps_logged']}, {runs[k]['status'].get('status', 'not run')})" for k in incomplete
        )

    def run_cell(kind: str, key: str) -> str:
        return str(runs[kind]["status"].get(key, "-"))

    val_windows = cfg["eval_batches"] * cfg["batch_size"]
    lines = [
        "# Hierarchical vs dense attention at equal tokens: bits per byte and training speed",
        "",
        headline,
        "",
        (
            f"Card: **{card_text}**; torch {env['torch']}; triton {env['triton']}; Python {env['python']}; "
            f"git {env['git']}; host {env['host']}; {env['date']}."
        ),
        sdpa_line(env.get("sdpa")),
        "",
        f"Model: {model}; {fmt(params['hierarchical'], '.2f')}M / {fmt(params['dense'], '.2f')}M parameters "
        f"(hierarchical / dense); {precision}. Preset `{cfg['preset']}`; batch {cfg['batch_size']} x {cfg['seq_len']} "
        f"= {tokens_per_step:,} tokens/step, {cfg['max_steps']} steps = {budget:,} tokens per run; AdamW, lr "
        f"{cfg['lr']:g} (warm-up {cfg['warmup_steps']} steps, cosine to lr/10), seed {cfg['seed']}"
        + (f"; extra arguments: `{' '.join(cfg['extra'])}`" if cfg.get("extra") else "")
        + ".",
        f"Data: {h['log'].get('data') or d['log'].get('data') or 'default corpus'}.",
        f"Validation during training: every {cfg['eval_every']} steps, the same {val_windows} windows of "
        f"{cfg['seq_len']} bytes ({val_windows * cfg['seq_len']:,} bytes) for both runs. Runs "
        + (
            "concurrently" + (", one per GPU." if cfg.get("device") != "cpu" else ".")
            if cfg.get("parallel")
            else "one after the other."
        )
        + f" Tokens/s over the steps after {skip} (warm-up), evaluation and checkpoints excluded.",
        "",
        "| | hierarchical | dense | hierarchical vs dense | target | |",
        "|---|---|---|---|---|---|",
    ]
    if at:
        same_tokens = "" if at["tokens"] == at["tokens_dense"] else " (tokens differ!)"
        lines.append(
            f"| validation bpb at step {at['step']} ({at['tokens']:,.0f} tokens{same_tokens}; last common "
            f"evaluation) | {at['hierarchical']:.4f} | {at['dense']:.4f} | {at['diff_pct']:+.2f}% | "
            f"<= +{BPB_TARGET_PCT:g}% | {mark(cmp['bpb_ok'])} |"
        )
        lines.append(
            f"| best validation bpb (evaluations up to step {at['step']}) | {best['hierarchical']:.4f} "
            f"(step {best['hierarchical_step']}) | {best['dense']:.4f} (step {best['dense_step']}) | "
            f"{best['diff_pct']:+.2f}% | | |"
        )
    else:
        lines.append("| validation bpb | - | - | - | | |")
    if full:
        where = (f"step {full['step']}" if full["same_step"] else "different steps: " + ", ".join(
            f"{k} step {runs[k]['full_eval'].get('step')}" for k in KINDS))  # fmt: skip
        windows = h["full_eval"].get("windows")
        lines.append(
            f"| final checkpoint on the validation split ({where}"
            + (f", {windows:,} windows" if windows else "")
            + f") | {full['hierarchical']:.4f} | {full['dense']:.4f} | "
            f"{full['diff_pct']:+.2f}% | <= +{BPB_TARGET_PCT:g}% | {mark(full['diff_pct'] <= BPB_TARGET_PCT)} |"
        )
    if ht or dt:
        ratio = cmp.get("speed_ratio")
        lines.append(
            f"| training tokens/s | {fmt(ht and ht['tokens_per_s'])} | {fmt(dt and dt['tokens_per_s'])} | "
            f"{fmt(ratio, '.2f')}{'x' if ratio else ''} | >= {SPEED_TARGET:g}x | {mark(cmp.get('speed_ok'))} |"
        )
        lines.append(
            f"| median ms per step (steps used) | {fmt(ht and ht['step_ms_median'], '.1f')} "
            f"({'-'.join(map(str, ht['steps_used'])) if ht else '-'}) | {fmt(dt and dt['step_ms_median'], '.1f')} "
            f"({'-'.join(map(str, dt['steps_used'])) if dt else '-'}) | | | |"
        )
    last = {k: (runs[k]["evals"][-1] if runs[k]["evals"] else None) for k in KINDS}
    lines += [
        "| last evaluation of each run | "
        + " | ".join(f"{e['val_bpb']:.4f} (step {e['step']})" if e else "-" for e in last.values())
        + " | | | |",
        f"| steps done of {cfg['max_steps']} | {h['steps_logged']} | {d['steps_logged']} | | | |",
        (
            f"| training loop time, s (metrics.csv elapsed_s) | {fmt(h['elapsed_s'], '.0f')} | {fmt(d['elapsed_s'], '.0f')} "
            "| | | |"
        ),
        (
            f"| wall time of the training process, s | {run_cell('hierarchical', 'wall_s')} | {run_cell('dense', 'wall_s')} "
            "| | | |"
        ),
        f"| status | {run_cell('hierarchical', 'status')} | {run_cell('dense', 'status')} | | | |",
        "",
        "## Validation bits per byte at each evaluation",
        "",
        "| step | tokens | hierarchical | dense | hierarchical vs dense |",
        "|---|---|---|---|---|",
    ]
    h_evals = {e["step"]: e for e in h["evals"]}
    d_evals = {e["step"]: e for e in d["evals"]}
    for step in sorted(set(h_evals) | set(d_evals)):
        he, de = h_evals.get(step), d_evals.get(step)
        tokens = (he or de)["tokens"]
        diff = pct(he and he["val_bpb"], de and de["val_bpb"])
        lines.append(f"| {step} | {tokens:,.0f} | {fmt(he and he['val_bpb'], '.4f')} | "
                     f"{fmt(de and de['val_bpb'], '.4f')} | {fmt(diff, '+.2f')}{'%' if diff is not None else ''} |")  # fmt: skip
    notes = []
    for kind in KINDS:
        status = runs[kind]["status"]
        if status.get("stopped_by"):
            notes.append(f"- {kind}: stopped ({status['stopped_by']}) at step {runs[kind]['steps_logged']}; "
                         "its numbers are those of its last evaluation")  # fmt: skip
        if status.get("note"):
            notes.append(f"- {kind}: {status['note']}")
        t = runs[kind].get("throughput")
        if t and not t["warmup_excluded"]:
            notes.append(f"- {kind}: fewer than {skip} steps logged; tokens/s includes warm-up steps")
    if cfg.get("parallel") and cfg.get("device") != "cpu":
        notes.append("- The two runs shared the host (CPU, disk) but not a GPU.")
    if notes:
        lines += ["", "Notes:", "", *notes]
    lines += [
        "",
        "## Commands",
        "",
        "The study:",
        "",
        "```",
        study.get("command") or "(unknown: no study.json)",
        "```",
        "",
    ]
    if study.get("report_command"):
        lines += ["This report, re-made from the run directories:", "", "```", study["report_command"], "```", ""]
    lines += ["Runs (from the repository root):", "", "```"]
    for kind in KINDS:
        status = study["runs"].get(kind, {})
        lines += [c for c in (status.get("command"), status.get("eval_command")) if c]
    lines += ["```", ""]
    write_text(out_dir / "quality.md", "\n".join(lines))
    plot(out_dir / "quality.png", runs, cmp, env, cfg, card_text)
    return result


def plot(path: Path, runs: dict, cmp: dict, env: dict, cfg: dict, card: str) -> None:
    plt = pyplot()
    colors = {"hierarchical": "tab:blue", "dense": "tab:orange"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), dpi=110)
    ax = axes[0]
    for kind in KINDS:
        run = runs[kind]
        if run["train"]:
            tokens = [r[1] / 1e6 for r in run["train"]]
            ax.plot(tokens, [r[2] for r in run["train"]], color=colors[kind], alpha=0.2, linewidth=0.8)
        if run["evals"]:
            ax.plot([e["tokens"] / 1e6 for e in run["evals"]], [e["val_bpb"] for e in run["evals"]], "o-",
                    color=colors[kind], markersize=3, label=f"{kind} validation")  # fmt: skip
    values = [e["val_bpb"] for k in KINDS for e in runs[k]["evals"]]
    if values:
        top = sorted(values)[len(values) // 2 + len(values) // 4] if len(values) > 3 else max(values)
        ax.set_ylim(min(values) - 0.05 * (top - min(values) + 0.1), top + 0.1 * (top - min(values) + 0.1))
        ax.legend()
    ax.set(
        xlabel="tokens seen (M)", ylabel="bits per byte", title="validation (markers) and train (faint) bits per byte"
    )
    ax.grid(alpha=0.3)

    ax = axes[1]
    h = {e["step"]: e for e in runs["hierarchical"]["evals"]}
    d = {e["step"]: e for e in runs["dense"]["evals"]}
    common = cmp.get("common_steps", [])
    if common:
        ax.plot([h[s]["tokens"] / 1e6 for s in common], [pct(h[s]["val_bpb"], d[s]["val_bpb"]) for s in common],
                "o-", color="tab:purple")  # fmt: skip
    ax.axhline(BPB_TARGET_PCT, color="tab:red", linestyle="--", label=f"target +{BPB_TARGET_PCT:g}%")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set(xlabel="tokens seen (M)", ylabel="%", title="validation bpb: hierarchical vs dense")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    for kind in KINDS:
        run = runs[kind]
        if run["train"]:
            ax.plot([r[0] for r in run["train"]], [r[3] for r in run["train"]], color=colors[kind], linewidth=0.8,
                    label=kind)  # fmt: skip
        t = run.get("throughput")
        if t:
            ax.axhline(t["tokens_per_s"], color=colors[kind], linestyle="--", linewidth=0.8)
    if any(runs[k]["train"] for k in KINDS):
        ax.legend()
        steady = [r[3] for k in KINDS for r in runs[k]["train"][cfg["skip_steps"] :]]
        if steady:
            ax.set_ylim(0, max(steady) * 1.15)
    ratio = cmp.get("speed_ratio")
    ax.set(xlabel="step", ylabel="tokens/s", title="training tokens/s per step (dashed: steady)"
           + (f"; ratio {ratio:.2f}x" if ratio else ""))  # fmt: skip
    ax.grid(alpha=0.3)
    fig.suptitle(f"{card}, torch {env['torch']}: context {cfg['seq_len']}, batch {cfg['batch_size']}, "
                 f"{cfg['max_steps']} steps, preset {cfg['preset']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# running the study
# ----------------------------------------------------------------------------------------------------


class Run:
    """One attention kind: training, then the full validation evaluation of its last checkpoint."""

    def __init__(self, kind: str, args, runs_dir: Path, env_extra: dict, status: dict):
        self.kind, self.args, self.dir, self.env_extra, self.status = kind, args, runs_dir / kind, env_extra, status
        self.job: Job | None = None
        self.phase = "waiting"  # waiting, training, evaluating, finished
        self.deadline: float | None = None
        status["command"] = shown(train_command(args, kind, self.dir), env_extra)
        status["status"] = "waiting"

    def start(self, deadline: float) -> None:
        fresh_run_dir(self.dir)
        command = train_command(self.args, self.kind, self.dir)
        print(f"{self.kind}: {self.status['command']}", flush=True)
        self.deadline = deadline
        self.job = Job(command, self.dir / "train.log", child_env(self.env_extra))
        self.phase, self.status["status"] = "training", "training"

    def step(self, now: float) -> None:
        """Advance: notice a finished job, start the evaluation, or stop what outlived the deadline."""
        if self.phase not in ("training", "evaluating"):
            return
        rc = self.job.poll()
        if rc is None:
            if now >= self.deadline:
                self.stop(f"--time-limit reached while {self.phase}")
            return
        if self.phase == "training":
            self.status.update(rc=rc, wall_s=round(self.job.seconds, 1))
            if rc != 0:
                self.status["status"] = f"failed (exit {rc})"
                print(f"{self.kind}: training failed (exit {rc}):\n{self.job.tail()}", file=sys.stderr, flush=True)
                self.phase = "finished"
                return
            self.status["status"] = "trained"
            self.start_eval(now)
        else:
            self.finish_eval(rc)

    def start_eval(self, now: float) -> None:
        if not self.args.full_eval:
            self.phase, self.status["status"] = "finished", "done"
            return
        if self.deadline - now < self.args.min_eval_seconds:
            self.status["note"] = "no time left for the full validation evaluation"
            self.phase, self.status["status"] = "finished", "done (no full evaluation)"
            return
        command = eval_command(self.args, self.dir)
        self.status["eval_command"] = shown(command, self.env_extra)
        print(f"{self.kind}: {self.status['eval_command']}", flush=True)
        self.job = Job(command, self.dir / "evaluate.log", child_env(self.env_extra))
        self.phase, self.status["status"] = "evaluating", "evaluating"

    def finish_eval(self, rc: int) -> None:
        self.phase = "finished"
        result = parse_full_eval(self.job.tail(20000)) if rc == 0 else None
        if result:
            result["command"] = self.status.get("eval_command")
            write_json(self.dir / FULL_EVAL_FILE, result)
            self.status["status"] = "done"
        else:
            self.status["status"] = f"done (full evaluation failed, exit {rc})"
            print(f"{self.kind}: evaluation failed:\n{self.job.tail()}", file=sys.stderr, flush=True)

    def stop(self, why: str) -> None:
        if self.job is None or self.phase not in ("training", "evaluating"):
            return
        was = self.phase
        rc = self.job.stop(why, grace=20)
        self.phase = "finished"
        if was == "training":
            self.status.update(rc=rc, wall_s=round(self.job.seconds, 1), stopped_by=why, status="stopped")
        else:
            self.status.update(note=f"full evaluation stopped ({why})", status="done (full evaluation stopped)")
        print(f"{self.kind}: stopped ({why})", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="directory of the two runs (default: runs/quality[_quick])")
    parser.add_argument(
        "--out-dir", type=Path, help="report directory (default: benchmarks/results; --quick: results/quick)"
    )
    parser.add_argument("--report-only", action="store_true", help="write the report from --runs, train nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model, a few steps (with --device cpu)")
    parser.add_argument("--preset", help=f"train --preset (default: {DEFAULTS['preset']})")
    parser.add_argument("--seq-len", type=int, help=f"context (default: {DEFAULTS['seq_len']})")
    parser.add_argument("--batch-size", type=int, help=f"sequences per step (default: {DEFAULTS['batch_size']})")
    parser.add_argument(
        "--max-steps", type=int, help=f"steps of each run: the token budget (default: {DEFAULTS['max_steps']})"
    )
    parser.add_argument("--warmup-steps", type=int, help=f"learning-rate warm-up (default: {DEFAULTS['warmup_steps']})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default: {DEFAULTS['lr']:g})")
    parser.add_argument("--eval-every", type=int, help=f"validation every N steps (default: {DEFAULTS['eval_every']})")
    parser.add_argument("--eval-batches", type=int, help=f"validation batches (default: {DEFAULTS['eval_batches']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs (default: 0)")
    parser.add_argument("--extra", action="append", default=[], metavar="ARGS",
                        help="more train arguments for both runs, one quoted string (repeatable), e.g. --extra '--data enwik8.zip'")  # fmt: skip
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if a GPU is visible"
    )
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="run both at once (on a GPU each: --gpu-ids) (default: off; --quick: on)")  # fmt: skip
    parser.add_argument("--gpu-ids", nargs=2, metavar=("HIER", "DENSE"),
                        help="with --parallel: the visible GPUs of the two runs (default: the first two)")  # fmt: skip
    parser.add_argument(
        "--skip-steps", type=int, help=f"warm-up steps left out of tokens/s (default: {DEFAULTS['skip_steps']})"
    )
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds for training and evaluating (all runs together; one after the other, each run gets "
                        "an equal share of what is left); what still runs then is stopped and reported from its last "
                        "evaluation (default: 480)")  # fmt: skip
    parser.add_argument("--full-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="score each final checkpoint on the validation split with `evaluate` (default: on)")  # fmt: skip
    parser.add_argument("--full-eval-batches", type=int,
                        help="evaluate --max-batches for that (0 = the whole split; default: 0, --quick: 2)")  # fmt: skip
    parser.add_argument("--min-eval-seconds", type=float, default=30.0,
                        help="start the full evaluation only with this much time left (default: 30)")  # fmt: skip
    parser.add_argument(
        "--report-every", type=float, default=30.0, help="rewrite the report every S seconds (default: 30)"
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS per run on the CPU (default: 1)")
    args = parser.parse_args()

    base = QUICK if args.quick else DEFAULTS
    for key, value in base.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.parallel is None:
        args.parallel = args.quick
    runs_dir = (args.runs or REPO_ROOT / "runs" / ("quality_quick" if args.quick else "quality")).resolve()
    out_dir = args.out_dir or (RESULTS_DIR / "quick" if args.quick else RESULTS_DIR)
    study_file = runs_dir / "study.json"

    if args.report_only:
        try:
            study = json.loads(study_file.read_text())
        except (OSError, ValueError):
            if not all((runs_dir / kind / "metrics.csv").is_file() for kind in KINDS):
                parser.error(f"--report-only: {runs_dir} holds neither study.json nor hierarchical/ and dense/ runs")
            study = {
                "env": environment(args.device),
                "command": None,
                "runs": {},
                "settings": settings_of(args, runs_dir),
            }
            stored = read_run_config(runs_dir / "hierarchical") or read_run_config(runs_dir / "dense") or {}
            study["settings"].update({k: v for k, v in stored.items() if k in study["settings"]})
            study["settings"]["preset"] = "(from the runs' config.json)"
            study["env"]["card"] += " (report machine; the runs' card is unknown: no study.json)"
        if "--skip-steps" in sys.argv:
            study["settings"]["skip_steps"] = args.skip_steps
        study["report_command"] = script_command()
        for status in study["runs"].values():  # the study script itself was killed while these ran
            if status.get("status") in ("waiting", "training", "evaluating"):
                status["status"] = f"interrupted while {status['status']}"
        report(out_dir, runs_dir, study)
        print((out_dir / "quality.md").read_text())
        return 0

    if args.device == "auto":
        args.device = "cuda" if gpu_count() > 0 else "cpu"
    extra_env = {kind: {} for kind in KINDS}
    cards = {}
    if args.device == "cpu":
        for kind in KINDS:
            extra_env[kind]["OMP_NUM_THREADS"] = str(args.threads or 1)
    if args.device == "cuda":
        names = gpu_names()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        visible = visible or [str(i) for i in range(max(len(names), gpu_count()))]
        if args.parallel:
            ids = args.gpu_ids or visible[:2]
            if len(ids) < 2:
                parser.error(f"--parallel needs two GPUs, {len(visible)} visible")
            for kind, index in zip(KINDS, ids):
                extra_env[kind]["CUDA_VISIBLE_DEVICES"] = index
                position = visible.index(index) if index in visible else None
                cards[kind] = names[position] if position is not None and position < len(names) else None
        else:
            cards = {kind: names[0] if names else None for kind in KINDS}

    install_stop_handlers()
    env = environment(args.device)
    study = {"env": env, "command": script_command(), "settings": settings_of(args, runs_dir), "runs": {}}
    runs = []
    for kind in KINDS:
        study["runs"][kind] = {"card": cards.get(kind)}
        runs.append(Run(kind, args, runs_dir, extra_env[kind], study["runs"][kind]))
    if (
        args.parallel
        and args.device == "cuda"
        and extra_env["hierarchical"].get("CUDA_VISIBLE_DEVICES") == extra_env["dense"].get("CUDA_VISIBLE_DEVICES")
    ):
        study["runs"]["dense"]["note"] = "both runs shared one GPU: tokens/s are not comparable"
    for run in runs:  # before anything is reported: no directory of an earlier study is read as this one's
        fresh_run_dir(run.dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    print(f"quality: {env['card']}, torch {env['torch']}, {'parallel' if args.parallel else 'sequential'} runs in "
          f"{runs_dir}, report in {out_dir}, time limit {args.time_limit:.0f} s", flush=True)  # fmt: skip

    def save() -> None:
        write_json(study_file, study)
        report(out_dir, runs_dir, study)

    start = time.monotonic()
    deadline = start + args.time_limit
    last_report = 0.0
    try:
        while True:
            now = time.monotonic()
            active = [r for r in runs if r.phase in ("training", "evaluating")]
            waiting = [r for r in runs if r.phase == "waiting"]
            if args.parallel:
                for run in waiting:
                    run.start(deadline)
            elif waiting and not any(r.phase == "training" for r in runs) and not active:
                share = (deadline - now) / len(waiting)
                waiting[0].start(now + share)
            for run in runs:
                run.step(time.monotonic())
            if all(r.phase == "finished" for r in runs):
                break
            if time.monotonic() - last_report >= args.report_every:
                save()
                last_report = time.monotonic()
            time.sleep(1.0)
    except Stop as e:
        for run in runs:
            run.stop(f"script received {e}")
        save()
        print(f"quality: stopped by {e}; report of what the runs logged in {out_dir}", file=sys.stderr)
        return 1
    study["env"]["sdpa"] = probe_sdpa(args.device, runs_dir / "dense", extra_env["dense"])
    save()
    print((out_dir / "quality.md").read_text())
    return 0


def probe_sdpa(device: str, dense_run: Path, env: dict | None = None) -> dict:
    """Which SDPA backend the dense run used: its kernels at the run's shape, probed after the runs (the
    GPU is free then), in a child process with the run's environment `env` (its GPU)."""
    if device != "cuda":
        return {"error": "probed on CUDA only"}
    cfg = read_run_config(dense_run)
    if not cfg:
        return {"error": f"no config.json in {dense_run}"}
    micro_batch = cfg["batch_size"] // max(1, cfg.get("grad_accum", 1))
    return sdpa_kernels_in_child(micro_batch, cfg["heads"], cfg["seq_len"], cfg["dim_head"], env=env)


def settings_of(args, runs_dir: Path) -> dict:
    keys = ("preset", "seq_len", "batch_size", "max_steps", "warmup_steps", "lr", "eval_every", "eval_batches",
            "seed", "extra", "device", "parallel", "gpu_ids", "skip_steps", "time_limit", "full_eval",
            "full_eval_batches", "quick")  # fmt: skip
    out = {k: getattr(args, k, None) for k in keys}
    out["runs"] = str(runs_dir)
    return out


if __name__ == "__main__":
    sys.exit(main())
