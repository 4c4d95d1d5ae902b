"""benchmarks/scaling.py, quality.py, lra_listops.py, train_speed.py, ... in their CPU quick modes, and their report code
(and decode.py's handling of repeated measurements).

The two scripts start in one fixture, at the same time (most of their time is Python and torch
starting up in the training processes), and the tests read what they wrote.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import attention_gpu
import cuda_graphs
import decode
import length_ratios
import lra_listops
import quality
import scaling
import train_speed

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    commands = {
        "scaling": [sys.executable, str(BENCH / "scaling.py"), "--device", "cpu", "--quick",
                    "--out-dir", str(root / "scaling_out"), "--runs-dir", str(root / "scaling_runs")],
        "quality": [sys.executable, str(BENCH / "quality.py"), "--device", "cpu", "--quick", "--no-full-eval",
                    "--out-dir", str(root / "quality_out"), "--runs", str(root / "quality_runs")],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return root


def test_scaling_quick(studies):
    out = studies / "scaling_out"
    result = json.loads((out / "scaling.json").read_text())
    rows = {r["k"]: r for r in result["results"]}
    assert sorted(rows) == [1, 2]
    for k, row in rows.items():
        assert row["status"] == "done", row
        assert row["log"]["processes"] == k
        assert row["config"]["batch_size"] == 4 * k  # the same per-process batch
        assert row["throughput"]["warmup_excluded"] and row["throughput"]["steps_used"] == [5, 10]
        assert row["tokens_per_s"] > 0
        assert 0 < row["efficiency"] < 2
    assert rows[1]["efficiency"] == pytest.approx(1.0)
    assert result["env"]["torch"] and result["command"].startswith("PYTHONPATH=. python")
    md = (out / "scaling.md").read_text()
    assert "| 2 | 8 | done |" in md and "--nproc_per_node 2" in md and "efficiency" in md.lower()
    assert (out / "scaling.png").read_bytes().startswith(PNG)


def test_quality_quick(studies):
    out = studies / "quality_out"
    result = json.loads((out / "quality.json").read_text())
    runs, cmp = result["runs"], result["comparison"]
    for kind in ("hierarchical", "dense"):
        run = runs[kind]
        assert run["config"]["attention"] == kind and run["config"]["seq_len"] == 128
        assert [e["step"] for e in run["evals"]] == [4, 8]
        assert all(0 < e["val_bpb"] < 9 for e in run["evals"])
        assert run["throughput"]["tokens_per_s"] > 0
    other = {k: v for k, v in runs["hierarchical"]["config"].items() if k != "attention"}
    assert other == {k: v for k, v in runs["dense"]["config"].items() if k != "attention"}
    at = cmp["at"]
    assert at["step"] == 8 and at["tokens"] == at["tokens_dense"] == 8 * 4 * 128
    assert 0 < at["hierarchical"] < 9 and 0 < at["dense"] < 9
    assert math.isfinite(at["diff_pct"]) and abs(at["diff_pct"]) < 50
    assert cmp["speed_ratio"] > 0 and isinstance(cmp["target_met"], bool)
    md = (out / "quality.md").read_text()
    assert "| validation bpb at step 8" in md and ("✓" in md or "✗" in md)
    assert "--attention hierarchical" in md and "--attention dense" in md
    assert (out / "quality.png").read_bytes().startswith(PNG)
    assert result["env"]["sdpa"] == {"error": "probed on CUDA only"}
    assert "SDPA backend: not recorded (probed on CUDA only)." in md


def test_quality_report_only(studies, tmp_path):
    """The report is re-made from the run directories alone, without study.json."""
    runs = studies / "quality_runs"
    (runs / "study.json").rename(runs / "study.moved")
    try:
        command = [sys.executable, str(BENCH / "quality.py"), "--device", "cpu", "--report-only", "--runs", str(runs),
                   "--out-dir", str(tmp_path)]  # fmt: skip
        done = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        (runs / "study.moved").rename(runs / "study.json")
    assert done.returncode == 0, done.stderr[-3000:]
    before = json.loads((studies / "quality_out" / "quality.json").read_text())["comparison"]
    after = json.loads((tmp_path / "quality.json").read_text())["comparison"]
    assert after["at"] == before["at"]
    assert (tmp_path / "quality.png").read_bytes().startswith(PNG)


def write_metrics(run_dir: Path, rows: list[tuple]) -> None:
    run_dir.mkdir(parents=True)
    lines = ["step,tokens,lr,train_bpb,val_bpb,tokens_per_s,elapsed_s"]
    lines += [f"{s},{s * 100},0.001,2.0,{'' if v is None else v},{tps},{s}" for s, v, tps in rows]
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n4,4")  # a last row cut short by a kill


def test_quality_report_of_stopped_runs(tmp_path):
    """A run stopped early is compared at the last evaluation both runs reached."""
    write_metrics(tmp_path / "runs" / "hierarchical", [(1, None, 10), (2, 3.0, 300), (3, None, 300), (4, 2.06, 300)])
    write_metrics(tmp_path / "runs" / "dense", [(1, None, 10), (2, 3.1, 100), (3, None, 100)])
    settings = {"preset": "x", "seq_len": 10, "batch_size": 10, "max_steps": 6, "warmup_steps": 0, "lr": 1e-3,
                "eval_every": 2, "eval_batches": 1, "seed": 0, "skip_steps": 1, "parallel": True, "device": "cpu"}  # fmt: skip
    study = {"env": scaling.environment("cpu"), "command": "test", "settings": settings,
             "runs": {"dense": {"status": "stopped", "stopped_by": "--time-limit reached while training"}}}  # fmt: skip
    result = quality.report(tmp_path / "out", tmp_path / "runs", study)
    cmp = result["comparison"]
    assert cmp["at"]["step"] == 2 and cmp["at"]["diff_pct"] == pytest.approx((3.0 / 3.1 - 1) * 100)
    assert cmp["bpb_ok"] and cmp["speed_ratio"] == pytest.approx(3.0) and cmp["target_met"]
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "dense (step 3, stopped)" in md and "stopped (--time-limit reached while training)" in md


def test_steady_throughput_leaves_out_warmup():
    rows = [{"step": s, "tokens": 100 * s, "tokens_per_s": tps} for s, tps in [(1, 1.0), (2, 100.0), (3, 200.0)]]
    t = scaling.steady_throughput(rows, skip=1)
    assert t["steps_used"] == [2, 3] and t["warmup_excluded"]
    assert t["tokens_per_s"] == pytest.approx(200 / (1 + 0.5))  # tokens over time, not the mean of rates
    t = scaling.steady_throughput(rows, skip=5)  # fewer steps than the warm-up: the second half
    assert t["steps_used"] == [2, 3] and not t["warmup_excluded"]
    assert scaling.steady_throughput([], skip=1) is None


def test_parse_full_eval():
    text = (
        "val bits per byte: 1.2345\n(120 windows of 4096 bytes = 491,520 predicted bytes of 1,504,727; "
        "checkpoint runs/quality/dense at step 400; data: Python standard library (...), 31.5 MB)\n"
    )
    assert quality.parse_full_eval(text) == {
        "bpb": 1.2345, "windows": 120, "predicted_bytes": 491520, "split_bytes": 1504727, "step": 400
    }  # fmt: skip
    assert quality.parse_full_eval("error") is None


def test_lra_listops_quick(tmp_path):
    """Two variants of the ListOps recipe on tiny data, trained and reported (table, JSON, plot)."""
    command = [sys.executable, str(BENCH / "lra_listops.py"), "--quick", "--device", "cpu", "--variants", "hier",
               "dense-mean-lra-lr", "--runs", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "runs" / "data" / "basic_test.tsv").is_file()
    report = json.loads((tmp_path / "out" / "lra_listops.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert sorted(runs) == ["dense-mean-lra-lr", "hier"]
    assert runs["hier"]["config"]["pool"] == "cls" and runs["hier"]["config"]["attention"] == "hierarchical"
    dense = runs["dense-mean-lra-lr"]["config"]
    assert dense["pool"] == "mean" and dense["attention"] == "dense" and dense["grad_clip"] == 0
    for r in runs.values():
        assert r["finished"] and 0 <= r["test_accuracy"] <= 1 and [s for s, _ in r["val_curve"]] == [3, 6]
    md = (tmp_path / "out" / "lra_listops.md").read_text()
    # the flags column: what each run's config.json changed from the recipe's defaults (--quick shrinks all)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in md.splitlines() if line.startswith("| ")}
    assert rows["hier"].startswith("`--dim 32 --depth 1 ") and "--attention" not in rows["hier"]
    assert "--attention dense --pool mean" in rows["dense-mean-lra-lr"]
    assert "--lr 0.00158114 " in rows["dense-mean-lra-lr"] and "--grad-clip 0`" in rows["dense-mean-lra-lr"]
    assert (tmp_path / "out" / "lra_listops.png").read_bytes().startswith(PNG)


def test_lra_listops_report_of_a_stopped_and_a_diverged_run(tmp_path):
    header = "step,examples,lr,train_loss,train_acc,val_acc,examples_per_s,elapsed_s"
    for name, rows in {"hier": ["1,32,0.1,2.3,0.1,,10,1", "2,64,0.1,2.2,0.1,0.25,10,2"],
                       "dense": ["1,32,0.1,2.3,0.1,0.3,10,1", "2,64,0.1,nan,0.1,0.1,10,2"]}.items():  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    report = lra_listops.write_report(tmp_path, tmp_path / "out")
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["hier"]["best_val_accuracy"] == 0.25 and not runs["hier"]["finished"]
    assert runs["dense"]["first_nonfinite_loss_step"] == 2 and runs["dense"]["best_val_step"] == 1
    md = (tmp_path / "out" / "lra_listops.md").read_text()
    assert "unfinished: 2 steps logged" in md and "loss NaN from step 2" in md


def test_length_ratios_quick(tmp_path):
    """The paired length benchmark on small lengths: every pair measured in alternation, report written."""
    command = [sys.executable, str(BENCH / "length_ratios.py"), "--quick", "--rounds", "2", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "length_ratios.json").read_text())
    assert [(r["impl"], r["n_a"], r["n_b"], r["causal"]) for r in data["results"]] == [
        (impl, a, b, causal) for impl, a, b, _ in length_ratios.QUICK_PAIRS for causal in (False, True)
    ]
    for r in data["results"]:
        assert len(r["times_a"]) == len(r["times_b"]) == 2 and min(r["times_a"] + r["times_b"]) > 0
        assert r["ratio_of_minimums"] == pytest.approx(min(r["times_b"]) / min(r["times_a"]))
        assert ("meets_target" in r) == (r["target"] is not None)
    md = (tmp_path / "length_ratios.md").read_text()
    assert "| ours | 257 / 256 | no |" in md and "(context)" in md
    assert (tmp_path / "length_ratios.png").read_bytes().startswith(PNG)


def test_train_speed_quick(tmp_path):
    """The whole-model speed study on the CPU: dense and two block sizes at two contexts, each in its own
    process, with speeds against the dense run of the same context; table, JSON and plot written."""
    command = [sys.executable, str(BENCH / "train_speed.py"), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "train_speed.json").read_text())["rows"]
    assert [(r["context"], r["attention"], r["block"], r["batch_size"]) for r in rows] == [
        (128, "dense", None, 4), (128, "hierarchical", 16, 4), (128, "hierarchical", 32, 4),
        (256, "dense", None, 2), (256, "hierarchical", 16, 2), (256, "hierarchical", 32, 2),
    ]  # fmt: skip
    dense = {r["context"]: r["tokens_per_s"] for r in rows if r["attention"] == "dense"}
    for r in rows:
        assert "error" not in r and r["tokens_per_s"] > 0 and r["params"] == rows[0]["params"]
        if r["attention"] == "hierarchical":
            assert r["vs_dense"] == pytest.approx(r["tokens_per_s"] / dense[r["context"]])
    md = (tmp_path / "train_speed.md").read_text()
    assert {(r["attention"], r["path"]) for r in rows} == {("dense", "SDPA"), ("hierarchical", "blocked PyTorch")}
    assert "| 256 | eager | hierarchical, block 32 | blocked PyTorch |" in md and "Fastest against dense:" in md
    assert (tmp_path / "train_speed.png").read_bytes().startswith(PNG)


def test_train_speed_splits_kernel_time_and_checks_contexts(tmp_path):
    events = [("window_fwd_kernel", 300.0), ("coarsen_kernel", 100.0), ("ampere_sgemm", 500.0),
              ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 200.0), ("triton_poi_fused_add", 100.0)]  # fmt: skip
    split = train_speed.split_kernel_time(events, steps=2)
    assert split["attention_ms"] == pytest.approx(0.3) and split["other_ms"] == pytest.approx(0.3)
    assert "coarsen_kernel" in split["attention_kernels"] and "ampere_sgemm" not in split["attention_kernels"]
    command = [sys.executable, str(BENCH / "train_speed.py"), "--device", "cpu", "--contexts", "3000",
               "--out-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--contexts: each must divide --tokens-per-step 32768, got 3000" in done.stderr
    done = subprocess.run([*command[:-4], "--steps", "0"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--steps must be an integer >= 1, got 0" in done.stderr


def test_host_overhead_quick(tmp_path):
    """The host-time probe with the launches stubbed: both paths timed per shape, table, JSON and plot."""
    command = [sys.executable, str(BENCH / "host_overhead.py"), "--quick", "--out-dir", str(tmp_path)]
    done = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "host_overhead.json").read_text())["rows"]
    assert [(r["n"], r["block"]) for r in rows] == [(256, 32), (512, 64)]
    for r in rows:
        for path in ("custom ops", "autograd.Function"):
            assert 0 < r[f"{path}|fwd_us"] < r[f"{path}|fwd_bwd_us"]
    md = (tmp_path / "host_overhead.md").read_text()
    assert "| 512 | 64 | 8 |" in md and "--quick" in md
    assert (tmp_path / "host_overhead.png").read_bytes().startswith(PNG)
    done = subprocess.run([*command, "--calls", "0"], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--calls must be an integer >= 1, got 0" in done.stderr


def test_cuda_graphs_report(tmp_path):
    """The CUDA-graphs study's table and plot from given rows: ratios against dense in the same mode and
    against dense eager; a failed configuration shows its error."""
    meta = {"card": "Card X", "torch": "2.x", "triton": "3.x", "git": "abc", "date": "today", "command": "cmd",
            "preset": "base", "params": 38e6, "context": 4096, "batch": 8, "steps": 20}  # fmt: skip
    rows = [
        {"attention": "dense", "block": None, "mode": "eager", "ms_per_step": 80.0, "tokens_per_s": 1, "loss": 5.0},
        {"attention": "dense", "block": None, "mode": "reduce-overhead", "ms_per_step": 40.0, "tokens_per_s": 2,
         "loss": 5.0},
        {"attention": "hierarchical", "block": 512, "mode": "eager", "ms_per_step": 64.0, "tokens_per_s": 3,
         "loss": 5.1},
        {"attention": "hierarchical", "block": 512, "mode": "reduce-overhead", "error": "RuntimeError: a | b"},
    ]  # fmt: skip
    md = cuda_graphs.report({"meta": meta, "rows": rows})
    assert "| hierarchical, block 512 | eager | 64.0 | 3 | 1.25x | 1.25x | 5.1000 |" in md
    assert "| dense (SDPA) | reduce-overhead | 40.0 | 2 | 1.00x | 2.00x | 5.0000 |" in md
    assert "| hierarchical, block 512 | reduce-overhead | failed: RuntimeError: a / b |" in md
    assert "Card: **Card X**" in md and "`cmd`" in md
    assert "SDPA backend: not recorded." in md
    meta["sdpa"] = {"backend": "flash attention", "kernels": ["flash_fwd_kernel", "flash_bwd_kernel"],
                    "shape": "8x8x4096x64 bf16 causal"}  # fmt: skip
    md = cuda_graphs.report({"meta": meta, "rows": rows})
    assert ("SDPA backend (dense attention): **flash attention**; kernels of one forward and backward at "
            "8x8x4096x64 bf16 causal: `flash_fwd_kernel`, `flash_bwd_kernel`.") in md  # fmt: skip
    cuda_graphs.plot({"meta": meta, "rows": rows}, tmp_path / "cg.png")
    assert (tmp_path / "cg.png").read_bytes().startswith(PNG)


def test_attention_gpu_report_names_the_sdpa_backend(tmp_path):
    """attention_gpu.py's report: a row per length with the ratio to ours, and a line per SDPA probe (a
    failed probe shows its error)."""
    env = {"card": "Card X", "torch": "2.x", "triton": "3.x", "sdpa": {
        "non-causal": {"backend": "cuDNN attention", "kernels": ["cudnn_fprop", "cudnn_bprop"],
                       "shape": "1x8x16384x64 bf16"},
        "causal": {"error": "RuntimeError: no kernel"}}}  # fmt: skip
    layer = [
        {"impl": "ours", "causal": False, "n": 1024, "fwd_bwd": {"ms": 2.0, "peak_mib": 25.0}, "fwd": {"ms": 1.0, "peak_mib": 9.0}},
        {"impl": "sdpa", "causal": False, "n": 1024, "fwd_bwd": {"ms": 3.0, "peak_mib": 22.0}, "fwd": {"ms": 0.5, "peak_mib": 8.0}},
    ]  # fmt: skip
    results = {
        "ours": {"layer": layer[:1], "core": [], "model": []},
        "sdpa": {"layer": layer[1:], "core": [], "model": []},
    }
    attention_gpu.report(results, env, tmp_path)
    md = (tmp_path / "attention_gpu.md").read_text()
    assert "| 1,024 | 2.00 | 3.00 | - | 1.5x | - | 1.00 | 0.50 | - | 25 | 22 | - |" in md
    assert ("Non-causal: SDPA backend (dense attention): **cuDNN attention**; kernels of one forward and backward at "
            "1x8x16384x64 bf16: `cudnn_fprop`, `cudnn_bprop`.") in md  # fmt: skip
    assert "Causal: SDPA backend: not recorded (RuntimeError: no kernel)." in md
    assert json.loads((tmp_path / "attention_gpu.json").read_text())["env"] == env
    assert (tmp_path / "attention_gpu.png").read_bytes().startswith(PNG)


def test_length_ratios_rejects_bad_rounds(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "length_ratios.py"), "--rounds", "0", "--out-dir", str(tmp_path)], check=False,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--rounds must be a positive integer, got 0" in done.stderr


def test_coarsen_kernel_quick(tmp_path):
    """The coarsening micro-benchmark on the CPU interpreter: both settings run the package's launch
    code and write the same packed buffers; table, JSON and plot written."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    command = [
        sys.executable,
        str(BENCH / "coarsen_kernel.py"),
        "--quick",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "coarsen_kernel.json").read_text())
    rows = data["rows"]
    assert [(r["levels_per_launch"], r["warps"]) for r in rows] == [(6, 4), (2, 1)]
    assert rows[0]["same_as_first"] is None and rows[1]["same_as_first"] is True
    assert rows[1]["launches"] == 2 and rows[0]["launches"] == 1  # N=200, block 16: 3 coarse levels
    md = (tmp_path / "coarsen_kernel.md").read_text()
    assert "| 2 | 2 | 200 | 16 | yes | 2 | 1 | 2 |" in md
    assert (tmp_path / "coarsen_kernel.png").read_bytes().startswith(PNG)


def test_decode_kernel_quick(tmp_path):
    """The decoding-step tuning script on the CPU interpreter: each setting's logits checked against the
    PyTorch step's, table, JSON and plot written."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    command = [
        sys.executable,
        str(BENCH / "decode_kernel.py"),
        "--quick",
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "decode_kernel.json").read_text())["rows"]
    assert [(r["chunk"], r["warps"]) for r in rows] == [(None, None), (32, 1), (4, 1)]
    assert all(r["agrees"] and r["max_logit_diff"] < 1e-5 and r["steps"] == 3 for r in rows)
    assert "| 4 slots x 1 warps |" in (tmp_path / "decode_kernel.md").read_text()
    assert (tmp_path / "decode_kernel.png").read_bytes().startswith(PNG)


def test_decode_repeats_keep_the_median_and_show_the_range():
    runs = [
        {"ms_per_token": 30.2, "tokens": 16, "other_cpu_share": 0.01},
        {"error": "timed out"},
        {"ms_per_token": 14.0, "other_cpu_share": 0.3},  # disturbed: the kept entry is marked
        {"ms_per_token": 21.1, "other_cpu_share": 0.02},
    ]
    kept = decode.median_of(runs)
    assert kept["ms_per_token"] == 21.1 and kept["repeats_ms"] == [14.0, 21.1, 30.2]
    assert kept["repeats_failed"] == 1 and kept["other_cpu_share"] == 0.3
    assert decode.fmt_ms(kept) == "21.10 (14.0-30.2; 1 failed) †"
    assert decode.fmt_ms(decode.median_of(runs[2:])) == "14.00 (14.0-21.1) †"
    assert decode.fmt_ms({"ms_per_token": 1234.5, "repeats_ms": [1000.0, 1234.5]}) == "1,234.5 (1,000.0-1,234.5)"
    assert decode.fmt_ms({"ms_per_token": 21.1, "repeats_ms": [21.1]}) == "21.10"  # one run: no range
    assert decode.median_of([{"error": "a"}, {"error": "b"}]) == {"error": "a"}
    assert decode.median_of([{"ms_per_token": 2.0}, {"ms_per_token": 1.0}])["ms_per_token"] == 1.0  # lower middle


@pytest.mark.parametrize(
    "kernels, backend",
    [
        ([], "math"),
        (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "cudnn_generated_bprop"], "cuDNN attention"),
        (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>"], "flash attention"),
        (["fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "fmha_cutlassB_bf16"], "memory-efficient attention"),
        (["some_attention_kernel"], "other"),
    ],
)
def test_sdpa_backend_is_named_from_its_kernels(kernels, backend):
    assert scaling.sdpa_backend_of(kernels) == backend


def test_sdpa_probe_reports_a_failure_instead_of_raising():
    """Without CUDA (or when the probe dies), the studies record why rather than stop."""
    probe = scaling.sdpa_kernels_in_child(1, 2, 64, 16, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a GPU host
    assert set(probe) == {"error"} and probe["error"]
    assert scaling.sdpa_line(probe) == f"SDPA backend: not recorded ({probe['error']})."
    assert quality.probe_sdpa("cpu", Path("nowhere")) == {"error": "probed on CUDA only"}
    probe = scaling.sdpa_kernels_or_error(1, 2, 64, -1)  # an impossible shape: fails on any host
    assert set(probe) == {"error"} and probe["error"]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_sdpa_probe_on_a_gpu():
    """On a GPU the probe sees SDPA's kernels, forward and backward, and names a fused backend (the math
    backend only runs where no fused one takes the shape: not at this one)."""
    probe = scaling.sdpa_kernels_in_child(2, 4, 1024, 64)
    assert "error" not in probe, probe
    assert probe["backend"] in ("cuDNN attention", "flash attention", "memory-efficient attention"), probe
    assert len(probe["kernels"]) >= 2 and probe["shape"] == "2x4x1024x64 bf16 causal"
    assert probe == scaling.sdpa_kernels(2, 4, 1024, 64)
