"""Run one study of the registry and write benchmarks/results/<study>/<study>.{json,md,png}.

    python benchmarks/run.py list                      # the studies, what each measures, where it runs
    python benchmarks/run.py attention_cpu --quick     # a smoke run with tiny sizes (into results/quick/)
    python benchmarks/run.py decode_cuda --out /tmp/d  # the full study on a GPU, into /tmp/d

The runner picks the device, runs every case (warm-up and repetitions in common.time_fn), records the environment
(card, torch, triton, the SDPA backend), and writes the report after every case, so a run stopped early still
leaves one. Cases of the 0.1.9 package run in a worker process that imports only that package.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    LEGACY_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    TUNED_MALLOC,
    child_env,
    ensure_legacy,
    env_line,
    environment,
    markdown_table,
    plot_lines,
    sdpa_line,
    sdpa_probe,
    write_json,
)
from registry import STUDIES
from tqdm import tqdm

RESULT_TAG = "RUN_PY_RESULT:"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=[*STUDIES, "list"], help="what to measure (`list` describes them)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few repetitions")
    p.add_argument("--out", type=Path, help="report directory (default: benchmarks/results/<study>, --quick: a "
                   "temporary directory)")  # fmt: skip
    p.add_argument("--tag", help="report file names <study>_<tag>.* (e.g. a seed) instead of <study>.*")
    p.add_argument("--device", choices=["cpu", "cuda"], help="for studies that run on either (default: cuda if any)")
    p.add_argument("--cases", nargs="+", metavar="LABEL", help="only these cases: a label, or its first words (`layer`, `4096 eager`; labels: see the JSON)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones (default 1)")
    p.add_argument("--reps", type=int, help="timed repetitions / decoded tokens / rounds / steps (study default)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed repetitions per case (default 60)")
    p.add_argument("--threads", type=int, help="torch threads (and OMP_NUM_THREADS of training processes)")
    p.add_argument("--malloc", choices=["tuned", "default"], default="tuned",
                   help="glibc malloc for CPU studies: tuned keeps freed memory (default), default as shipped")
    p.add_argument("--profile", action="store_true", help="add a torch.profiler kernel breakdown of each case")
    p.add_argument("--no-legacy", action="store_true", help="skip the 0.1.9 baseline")
    p.add_argument("--legacy-dir", type=Path, default=LEGACY_DIR, help="where 0.1.9 is pip-installed (--no-deps)")
    g = p.add_argument_group("studies that train through the CLI (quality, train_speed, scaling, lra_listops)")
    g.add_argument("--runs", type=Path, help="run directories (default: runs/bench/<study> in the repository)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    g.add_argument("--gpus", type=int, nargs="+", help="scaling: process counts K (default 1 2 4; --quick 1 2)")
    g.add_argument("--jobs", type=int, default=1,
                   help="run N cases at once, case i on GPU i mod (the host's GPUs): several share a GPU (default 1)")
    g.add_argument("--resume", action="store_true",
                   help="continue each run whose directory holds a checkpoint (--resume with the same flags)")
    g.add_argument("--timeout", type=float, help="seconds per training run; then it is stopped and reported")
    g.add_argument("--extra", default="", help="more CLI arguments for every training run, one quoted string")
    g.add_argument("--report-only", action="store_true", help="re-make the report from --runs, train nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_device(study, requested: str | None) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    device = study.device if study.device != "any" else requested or ("cuda" if has_cuda else "cpu")
    if requested and requested != device:
        raise SystemExit(f"run.py: {study.name} runs on {study.device} only, not on {requested}")
    if device == "cuda" and not has_cuda:
        raise SystemExit(f"run.py: {study.name} needs a CUDA GPU and torch sees none on this machine; "
                         f"CPU studies: {', '.join(s.name for s in STUDIES.values() if s.device != 'cuda')}")
    return device


def measure_in_legacy_worker(study, case: dict, opts) -> dict:
    """One 0.1.9 case in a child whose PYTHONPATH holds only the 0.1.9 install (and benchmarks/)."""
    why = ensure_legacy(opts.legacy_dir)
    if why:
        return {"error": f"0.1.9 not installed: {why}"}
    payload = json.dumps({"case": case, "opts": {k: str(v) if isinstance(v, Path) else v  # rows: decode's budget
                                                  for k, v in vars(opts).items()}}, default=str)  # fmt: skip
    command = [sys.executable, str(Path(__file__).resolve()), study.name, "--worker", payload]
    done = subprocess.run(command, env=child_env(legacy=opts.legacy_dir), capture_output=True, text=True,
                          check=False, timeout=opts.budget * 20 + 600)  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return {"error": (done.stderr.strip().splitlines() or [f"worker exit status {done.returncode}"])[-1][:200]}


def measure(study, case: dict, opts) -> dict:
    try:
        if case.get("impl") == "0.1.9" and not opts.worker:
            return measure_in_legacy_worker(study, case, opts)
        return study.measure(case, opts)
    except Exception as error:
        if opts.worker:
            raise
        return {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"}


def measured(study, cases: list[dict], opts):
    """(case, result) as each finishes: one after the other, or --jobs at once (training runs, one GPU each)."""
    if opts.jobs <= 1:
        for case in cases:  # in order, each case sees the rows before it (opts.rows)
            yield case, measure(study, case, opts)
        return
    with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        futures = {pool.submit(measure, study, c, opts): c for c in cases}
        for future in concurrent.futures.as_completed(futures):
            yield futures[future], future.result()


def write_report(study, opts, env: dict, rows: list[dict], out: Path, stem: str) -> str:
    if study.finish:
        study.finish(rows)
    headline = study.headline(rows) if rows else "nothing measured"
    data = {"study": study.name, "what": study.what, "baselines": list(study.baselines), "command": opts.command,
            "headline": headline, "env": env, "rows": rows}  # fmt: skip
    write_json(out / f"{stem}.json", data)
    lines = [f"# {study.name}", "", study.what[0].upper() + study.what[1:] + ".", "", f"**{headline}**", "",
             env_line(env), sdpa_line(env.get("sdpa")) if "sdpa" in env else "", "", f"Command: `{opts.command}`", "",
             markdown_table(rows, study.index, study.values, study.series), ""]  # fmt: skip
    for r in rows:
        if r.get("profile"):
            lines += [f"Profile of {r['label']}: " + ", ".join(f"`{k}` {ms:.3f} ms" for k, ms in r["profile"]), ""]
    if study.plot:
        x, y, panels, series = study.plot
        points = study.points(rows) if study.points else rows
        plot_lines(out / f"{stem}.png", points, x, y, series, panels, f"{study.name}: {env['card']}, torch "
                   f"{env['torch']}", log=x != "mode")  # fmt: skip
        lines += [f"![{study.name}]({stem}.png)", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    return headline


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.study == "list":
        for s in STUDIES.values():
            print(f"{s.name:14} [{s.device}] {s.what}")
        return 0
    study = STUDIES[opts.study]
    tuned = os.environ.get("MALLOC_TOP_PAD_") == TUNED_MALLOC["MALLOC_TOP_PAD_"]
    if argv is None and study.device == "cpu" and opts.malloc == "tuned" and not opts.worker and not tuned:
        # malloc reads these at process start: run this command again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    if not opts.worker:  # this repository's package, not an installed copy (0.1.9 workers must not see it)
        sys.path.insert(1, str(REPO_ROOT))
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    opts.extra = shlex.split(opts.extra)
    if opts.worker:  # a 0.1.9 case: run it here and print the row
        job = json.loads(opts.worker)
        args = {**job["opts"], "runs": Path(job["opts"]["runs"]), "worker": True}
        print(RESULT_TAG + json.dumps(measure(study, job["case"], SimpleNamespace(**args))))
        return 0
    opts.device = resolve_device(study, opts.device)
    opts.command = "python benchmarks/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = opts.out or (Path(tempfile.mkdtemp(prefix=f"{study.name}_")) if opts.quick else RESULTS_DIR / study.name)
    out.mkdir(parents=True, exist_ok=True)
    opts.runs = (opts.runs or REPO_ROOT / "runs" / "bench" / study.name).resolve()
    stem = f"{study.name}_{opts.tag}" if opts.tag else study.name
    env = environment(opts.device)
    if study.sdpa:
        env["sdpa"] = sdpa_probe(opts.device, *study.sdpa(opts))
    if study.setup:
        study.setup(opts)
    cases = [c for c in study.cases(opts)
             if not opts.cases or any(c["label"] == p or c["label"].startswith(p + " ") for p in opts.cases)]
    for i, case in enumerate(cases):
        if opts.jobs > 1:
            case["gpu"] = i % max(1, min(opts.jobs, env["gpus"]))
    opts.rows = rows = []
    order = {c["label"]: i for i, c in enumerate(cases)}
    headline = "nothing measured"
    bar = tqdm(total=len(cases), desc=study.name, unit="case", dynamic_ncols=True)
    for case, result in measured(study, cases, opts):
        rows.append({**{k: v for k, v in case.items() if k != "gpu"}, **result})
        rows.sort(key=lambda r: order[r["label"]])
        bar.set_postfix_str(case["label"][:40])
        bar.update()
        headline = write_report(study, opts, env, rows, out, stem)
    bar.close()
    print(f"{study.name}: {headline}\n{len([r for r in rows if 'error' in r])} of {len(rows)} cases failed; "
          f"report in {out / stem}.md")
    for r in rows:
        if "error" in r:
            print(f"  {r['label']}: {r['error']}", file=sys.stderr)
    return 1 if rows and all("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
