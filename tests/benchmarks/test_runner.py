"""benchmarks/run.py and its registry on the CPU: every study that runs on a CPU, in --quick mode (tiny sizes) and
a subset of its cases where the full quick set proves nothing more, writes its JSON, markdown and PNG under a
temporary directory; GPU studies are refused; the report code (comparisons, failed cases, the SDPA probe) is checked
on given rows.

The study runs start together in one fixture (most of their time is Python and torch starting up in subprocesses)
and the tests read what they wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common
import registry
import run

from h_transformer_1d.attention import level_lengths

PNG = b"\x89PNG\r\n\x1a\n"
HAS_CUDA = __import__("torch").cuda.is_available()

# study -> the arguments of its quick run (--quick --device cpu --out --runs are added)
QUICK = {
    "attention_cpu": ["--no-legacy", "--cases", "layer"],
    "length_ratios": ["--reps", "2"],
    "kernels": ["--reps", "1"],
    "host": [],
    "kernel_resources": [],
    "decode_cpu": ["--no-legacy"],
    "quality": [],
    "train_speed": ["--cases", "128"],
    "scaling": [],
    "lra_listops": ["--cases", "hier", "dense-mean-lra-lr"],
    "pack": [],
}


def runner(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(BENCH / "run.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)  # fmt: skip


def run_done(*args: str) -> int:
    """run.py in this process (no interpreter start-up): its exit status; SystemExit passes through."""
    return run.main(list(args))


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")  # also the working directory: nothing depends on the cwd
    procs = {name: runner(name, "--quick", "--device", "cpu", "--out", str(root / name), "--runs",
                          str(root / f"{name}_runs"), *args, cwd=root) for name, args in QUICK.items()}  # fmt: skip
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=400)[0]
            assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-4000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return root


def load(root: Path, name: str) -> dict:
    return json.loads((root / name / f"{name}.json").read_text())


def test_every_cpu_study_is_covered():
    assert set(QUICK) == {name for name, s in registry.STUDIES.items() if s.device != "cuda"}


@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_study_writes_json_md_png(studies, name):
    study, data = registry.STUDIES[name], load(studies, name)
    assert data["study"] == name and data["env"]["torch"] and data["env"]["device"] == "cpu"
    assert data["command"].startswith(f"python benchmarks/run.py {name} --quick") and data["headline"]
    assert data["rows"] and not [r for r in data["rows"] if "error" in r]
    md = (studies / name / f"{name}.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| "))
    assert all(f"| {label} |" in header or f" {label} |" in header for _, label, _ in study.index)
    assert len(md.split("\n|---")[1].splitlines()) >= 1 and data["headline"] in md
    assert (studies / name / f"{name}.png").read_bytes().startswith(PNG)
    assert not list(studies.glob("*.md")), "nothing is written into the working directory"


def test_attention_cpu_quick(studies):
    rows = load(studies, "attention_cpu")["rows"]
    assert [(r["impl"], r["causal"], r["n"]) for r in rows] == [
        (impl, causal, n) for causal in (False, True) for n in (256, 512) for impl in ("ours", "SDPA")]  # fmt: skip
    assert all(r["ms"] > 0 and r["reps"] >= 1 for r in rows) and any(r["peak_mib"] > 0 for r in rows)
    md = (studies / "attention_cpu" / "attention_cpu.md").read_text()
    assert "| part | causal | N | ours fwd+bwd ms | SDPA fwd+bwd ms | ours MiB | SDPA MiB |" in md
    assert "| layer | no | 512 |" in md and "fwd ms" not in md  # forward-only is timed on a GPU only


def test_length_ratios_quick(studies):
    rows = load(studies, "length_ratios")["rows"]
    assert [(r["impl"], r["n_a"], r["n_b"], r["causal"]) for r in rows] == [
        (impl, a, b, causal) for impl, a, b, _ in registry.QUICK_PAIRS for causal in (False, True)]  # fmt: skip
    for r in rows:
        assert len(r["times_a"]) == len(r["times_b"]) == 2 and min(r["times_a"] + r["times_b"]) > 0
        assert r["ratio_of_minimums"] == pytest.approx(min(r["times_b"]) / min(r["times_a"]))
        assert ("meets_target" in r) == (r["target"] is not None)
    assert "| ours | 257 / 256 | no |" in (studies / "length_ratios" / "length_ratios.md").read_text()


def test_decode_cpu_quick(studies):
    rows = {(r["impl"], r["context"]): r for r in load(studies, "decode_cpu")["rows"]}
    assert sorted(rows) == [("cached", 256), ("cached", 512), ("uncached", 256), ("uncached", 512)]
    for c in (256, 512):
        cached, uncached = rows["cached", c], rows["uncached", c]
        assert cached["tokens"] == 8 and cached["cache_mib"] > 0 and cached["prefill_s"] > 0
        assert uncached["tokens"] == 2 and uncached["ms_per_token"] > 0 and "cache_mib" not in uncached
    md = (studies / "decode_cpu" / "decode_cpu.md").read_text()
    assert "| context | cached ms/token | uncached ms/token | cached max ms |" in md


def test_quality_quick(studies):
    data = load(studies, "quality")
    runs = {r["label"]: r for r in data["rows"]}
    for kind in ("hierarchical", "dense"):
        run_ = runs[kind]
        assert run_["config"]["attention"] == kind and run_["config"]["seq_len"] == 128
        assert [e[0] for e in run_["evals"]] == [4, 8] and all(0 < e[1] < 9 for e in run_["evals"])
        assert run_["tokens_per_s"] > 0 and run_["status"] == "done"
    other = {k: v for k, v in runs["hierarchical"]["config"].items() if k not in ("attention", "out")}
    assert other == {k: v for k, v in runs["dense"]["config"].items() if k not in ("attention", "out")}
    h = runs["hierarchical"]
    assert h["at_step"] == 8 and [e[2] for e in h["evals"]][-1] == 8 * 4 * 128
    assert abs(h["bpb_vs_dense_pct"]) < 50 and h["speed_vs_dense"] > 0 and isinstance(h["target_met"], bool)
    assert data["env"]["sdpa"]["backend"] in ("flash attention", "math")  # the CPU's SDPA, from its aten ops
    md = (studies / "quality" / "quality.md").read_text()
    assert "| hierarchical | done | 8 | 8 |" in md and "SDPA backend (dense attention): **" in md


def test_quality_report_only(studies, tmp_path):
    """The report is re-made from the run directories alone."""
    done = run_done("quality", "--quick", "--device", "cpu", "--report-only", "--runs", str(studies / "quality_runs"),
                    "--out", str(tmp_path))  # fmt: skip
    assert done == 0
    before = {r["label"]: r.get("bpb_at") for r in load(studies, "quality")["rows"]}
    assert {r["label"]: r.get("bpb_at") for r in json.loads((tmp_path / "quality.json").read_text())["rows"]} == before
    assert (tmp_path / "quality.png").read_bytes().startswith(PNG)


def write_metrics(run_dir: Path, header: str, rows: list[str]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("\n".join([header, *rows]) + "\n4,4")  # a last row cut short by a kill


def test_quality_report_of_stopped_runs(tmp_path):
    """A run stopped early is compared at the last evaluation both runs reached."""
    header = "step,tokens,lr,train_bpb,val_bpb,tokens_per_s,elapsed_s"
    row = "{0},{1},0.001,2.0,{2},{3},{0}".format
    write_metrics(tmp_path / "runs" / "hierarchical", header, [row(1, 100, "", 10), row(2, 200, 3.0, 300),
                                                               row(3, 300, "", 300), row(4, 400, 2.06, 300)])
    write_metrics(tmp_path / "runs" / "dense", header, [row(1, 100, "", 10), row(2, 200, 3.1, 100),
                                                        row(3, 300, "", 100)])  # fmt: skip
    done = run_done("quality", "--quick", "--device", "cpu", "--report-only", "--runs", str(tmp_path / "runs"),
                    "--out", str(tmp_path / "out"))  # fmt: skip
    assert done == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "out" / "quality.json").read_text())["rows"]}
    h = rows["hierarchical"]
    assert h["at_step"] == 2 and h["bpb_vs_dense_pct"] == pytest.approx((3.0 / 3.1 - 1) * 100)
    assert h["speed_vs_dense"] == pytest.approx(3.0) and h["target_met"]
    assert rows["dense"]["status"] == "stopped" and rows["dense"]["steps"] == 3


def test_train_speed_quick(studies):
    rows = load(studies, "train_speed")["rows"]
    assert [(r["context"], r["attention"], r["block"], r["batch_size"]) for r in rows] == [
        (128, "dense", None, 4), (128, "hierarchical", 16, 4)]  # fmt: skip
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["params"] == rows[0]["params"]
    assert rows[1]["vs_dense"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert "| 128 | eager | hierarchical, block 16 | 4 |" in (studies / "train_speed" / "train_speed.md").read_text()


def test_train_speed_refuses_a_context_that_does_not_divide_the_step():
    opts = SimpleNamespace(quick=False, runs=Path("unused"))
    assert registry.measure_bench({"context": 3000}, opts) == {
        "error": "context 3000 does not divide 32768 tokens per step"}  # fmt: skip


def test_kernels_quick(studies):
    """Both sides of every shape, with time, host time and the steady-state peak; the glue's bytes follow the
    packed layout (q, k and dO at every level, v above level 0)."""
    rows = load(studies, "kernels")["rows"]
    assert {(r["impl"], r["shape"], r["causal"]) for r in rows} == {
        (impl, shape, causal) for impl in ("ours", "SDPA") for shape in ("1k", "512 x2 gqa 4/2") for causal in (False, True)}
    for r in rows:
        assert r["ms"] > 0 and r["host_ms"] > 0 and r["peak_mib"] is not None, r["label"]
    mtot = sum(level_lengths(4096, registry.BLOCK))  # level 0: 4096 rows
    coarsen = 12 * 4096 + 10 * mtot + 2 * (mtot - 4096)  # reads q, k, v; writes q, k and v's coarse levels
    assert registry.glue_bytes(2, 8, 2, 4096, 64) == 2 * 64 * 2 * (coarsen + 8 * (2 * 4096 + mtot))


def test_host_quick(studies):
    """Both layers at every shape and causality, with the wall time of back-to-back steps and the host's time to
    issue one (on the CPU the host does the work too, so the two are close); the GPU-only columns stay empty."""
    report = load(studies, "host")
    rows = report["rows"]
    assert {(r["impl"], r["causal"]) for r in rows} == {(i, c) for i in ("ours", "SDPA") for c in (False, True)}
    for r in rows:
        assert r["wall_ms"] > 0 and r["host_ms"] > 0 and "busy_ms" not in r, r["label"]
        assert 0.3 < r["host_ms"] / r["wall_ms"] < 3, r["label"]
    assert report["headline"].startswith("ours, 256 x2 causal: wall ")


def test_kernel_resources_quick(studies):
    """Every window kernel (level 0 and coarse, its first tile) and glue kernel compiles for sm_90a here, without a
    GPU, and ptxas reports its registers (at most 255 per thread) and spilled bytes."""
    rows = load(studies, "kernel_resources")["rows"]
    assert {r["kernel"] for r in rows} == {"window_fwd_kernel", "window_bwd_dq_kernel", "window_bwd_dkdv_kernel",
                                          "coarsen_kernel", "fold_kernel"}  # fmt: skip
    for r in rows:
        if "note" in r:  # no ptxas on this machine
            continue
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["shared_kib"] >= 0, r["label"]
        assert r["loop_spills"] is None or r["loop_spills"] >= 0, r["label"]


def compiled_in_child(code: str):
    """The JSON that `code` prints last, run in a child interpreter that compiles for sm_90a: this one runs
    Triton's interpreter (conftest), which makes @jit kernels uncompilable. Skips without ptxas."""
    if registry._ptxas() is None:
        pytest.skip("no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(registry.__file__).parent), env.get("PYTHONPATH", "")])
    env["H_TRANSFORMER_1D_AUTOTUNE"] = "0"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


DEFAULT_TILE_CHECK = """
import json, registry
from h_transformer_1d.attention import triton_kernels as tk
rows = []
for name, tiles in tk.WINDOW_TILES.items():
    for d in (64, 128):
        tile = tk.tile_shape(tk.fit_block(tk.tile_configs(tiles), {}, NR=128, D=d)[0])
        for level0 in ((True, False) if name == "window_fwd_kernel" else (True,)):
            case = {"kernel": name, "d": d, "tile": list(tile), "level0": level0}
            rows.append({**case, **registry.measure_resources(case, None)})
print(json.dumps(rows))
"""


def test_default_tiles_keep_their_state_in_registers():
    """Compiled for sm_90a (no GPU needed), the tile each window kernel takes without autotuning, at head dims 64
    and 128 and block 128, spills nothing inside its loops over key or query tiles (the dq tile of 128 rows over 4
    warps spilled 108 bytes at 64, and dk/dv tiles of 64 keys up to 584 at 128). Outside them, where the level-0
    backward adds the coarse levels' gradients and undoes the rotary embedding once per program, a few spilled
    registers are tolerated."""
    rows = compiled_in_child(DEFAULT_TILE_CHECK)
    assert len(rows) == 8
    for row in rows:
        assert row["registers"] <= 255 and row["spill_bytes"] <= 256, row
        if row["loop_spills"] is not None:  # None: no cuobjdump beside ptxas
            assert row["loop_spills"] == 0, row


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                                  /* 0x00000a0000017a02 */
        /*0010*/                   STL [R1], R2 ;                                           /* 0x0000000201007387 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;           /* 0x0000000000187387 */
        /*0030*/                   LDL R3, [R1+0x4] ;                                       /* 0x0000040001037983 */
        /*0040*/              @!P0 BRA 0x20 ;                                               /* 0xfffffffc00008947 */
        /*0050*/                   STL [R1+0x8], R4 ;                                       /* 0x0000080401007387 */
        /*0060*/               @P1 BRA 0x80 ;                                               /* 0x0000000000041947 */
        /*0070*/                   LDL R5, [R1+0x8] ;                                       /* 0x0000080001057983 */
        /*0080*/                   EXIT ;                                                   /* 0x000000000000794d */
"""


def test_spills_in_loops_counts_only_loop_bodies():
    """One backward branch (0x40 -> 0x20) makes a loop holding one LDL; the STL before it, the STL and LDL after it
    (a forward branch is no loop) are outside."""
    assert registry.spills_in_loops(SASS) == 1
    assert registry.spills_in_loops(SASS.replace("BRA 0x20", "BRA 0x10")) == 2
    assert registry.spills_in_loops(SASS.replace("BRA 0x20", "BRA 0x50")) == 0


def test_scaling_quick(studies):
    """K = 1, 2, then K = 1 again; efficiency against the better 1-process run."""
    rows = load(studies, "scaling")["rows"]
    assert [(r["label"], r["k"]) for r in rows] == [("k1", 1), ("k2", 2), ("k1-last", 1)]
    for row in rows:
        k = row["k"]
        assert row["status"] == "done" and row["processes"] == k and row["global_batch"] == 4 * k
        assert row["warmup_excluded"] and row["steps_used"] == [5, 10]
        assert row["tokens_per_s"] > 0 and 0 < row["efficiency"] < 2
    ones = [r for r in rows if r["k"] == 1]
    best = max(r["tokens_per_s"] for r in ones)
    assert sorted(r["efficiency"] for r in ones) == pytest.approx(sorted(r["tokens_per_s"] / best for r in ones))
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["tokens_per_s"] / (2 * best))
    report = (studies / "scaling" / "scaling.md").read_text()
    assert "| 2 |  | 8 | done |" in report and "| 1 | last | 4 | done |" in report
    assert "K=1: " in report and "spread" in report
    log = (studies / "scaling_runs" / "k2" / "train.log").read_text()
    assert "--nproc_per_node 2" in log.splitlines()[0]


def test_steady_throughput_leaves_out_warmup():
    rows = [{"step": s, "tokens": 100 * s, "tokens_per_s": tps} for s, tps in [(1, 1.0), (2, 100.0), (3, 200.0)]]
    t = common.steady_throughput(rows, skip=1)
    assert t["steps_used"] == [2, 3] and t["warmup_excluded"]
    assert t["tokens_per_s"] == pytest.approx(200 / (1 + 0.5))  # tokens over time, not the mean of rates
    t = common.steady_throughput(rows, skip=5)  # fewer steps than the warm-up: the second half
    assert t["steps_used"] == [2, 3] and not t["warmup_excluded"]
    assert common.steady_throughput([], skip=1) is None


def test_lra_listops_quick(studies):
    rows = {r["label"]: r for r in load(studies, "lra_listops")["rows"]}
    assert sorted(rows) == ["dense-mean-lra-lr", "hier"]
    assert (studies / "lra_listops_runs" / "data" / "basic_test.tsv").is_file()
    config = common.run_config(studies / "lra_listops_runs" / "dense-mean-lra-lr")
    assert config["pool"] == "mean" and config["attention"] == "dense" and config["grad_clip"] == 0
    for r in rows.values():
        assert r["finished"] and 0 <= r["test_accuracy"] <= 1 and [s for s, _ in r["val_curve"]] == [3, 6]
    md = (studies / "lra_listops" / "lra_listops.md").read_text()
    assert "| hier | (recipe) |" in md and "| dense-mean-lra-lr | --attention dense --pool mean --lr 0.00158114 " in md


def test_lra_listops_report_of_a_stopped_and_a_diverged_run(tmp_path):
    header = "step,examples,lr,train_loss,train_acc,val_acc,examples_per_s,elapsed_s"
    write_metrics(tmp_path / "hier", header, ["1,32,0.1,2.3,0.1,,10,1", "2,64,0.1,2.2,0.1,0.25,10,2"])
    write_metrics(tmp_path / "dense", header, ["1,32,0.1,2.3,0.1,0.3,10,1", "2,64,0.1,nan,0.1,0.1,10,2"])
    done = run_done("lra_listops", "--report-only", "--device", "cpu", "--cases", "hier", "dense", "--runs",
                    str(tmp_path), "--out", str(tmp_path / "out"))  # fmt: skip
    assert done == 0
    rows = {r["label"]: r for r in json.loads((tmp_path / "out" / "lra_listops.json").read_text())["rows"]}
    assert rows["hier"]["best_val_accuracy"] == 0.25 and not rows["hier"]["finished"]
    assert rows["dense"]["note"] == "unfinished: 2 steps logged; loss NaN from step 2"
    assert rows["dense"]["best_val_step"] == 1
    md = (tmp_path / "out" / "lra_listops.md").read_text()
    assert "unfinished: 2 steps logged" in md and "loss NaN from step 2" in md


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name", [n for n, s in registry.STUDIES.items() if s.device == "cuda"])
def test_gpu_studies_are_refused_on_the_cpu(name, tmp_path):
    with pytest.raises(SystemExit, match=f"{name} needs a CUDA GPU and torch sees none on this machine"):
        run_done(name, "--quick", "--out", str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_a_cpu_study_refuses_another_device(tmp_path):
    with pytest.raises(SystemExit, match="length_ratios runs on cpu only, not on cuda"):
        run_done("length_ratios", "--device", "cuda", "--out", str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_legacy_cases_run_in_a_worker_that_sees_only_the_old_package(tmp_path):
    """A 0.1.9 case imports the package installed in --legacy-dir (here a stand-in whose layer fails), never
    this repository's; its failure becomes the row's error and the other cases still run."""
    fake = tmp_path / "legacy" / "h_transformer_1d"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.1.9'\n")
    (fake / "h_transformer_1d.py").write_text(
        "class HAttention1D:\n    def __init__(self, *a, **k):\n        raise AssertionError('the stand-in 0.1.9')\n")
    (tmp_path / "legacy" / ".installed").write_text("stand-in\n")
    done = run_done("attention_cpu", "--quick", "--cases", "layer ours non-causal 256", "layer 0.1.9 non-causal 256",
                    "--legacy-dir", str(tmp_path / "legacy"), "--out", str(tmp_path / "out"))  # fmt: skip
    assert done == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "out" / "attention_cpu.json").read_text())["rows"]}
    assert rows["0.1.9"]["error"] == "AssertionError: the stand-in 0.1.9" and rows["ours"]["ms"] > 0
    md = (tmp_path / "out" / "attention_cpu.md").read_text()
    assert "| layer | no | 256 |" in md and "| error: AssertionError: the stand-in 0.1.9 |" in md


def test_decode_skips_a_recomputing_context_past_the_budget():
    opts = SimpleNamespace(reps=None, quick=False, device="cpu", budget=60.0,
                           rows=[{"impl": "0.1.9", "context": 8192, "ms_per_token": 40_000.0}])  # fmt: skip
    row = registry.measure_decode({"impl": "0.1.9", "context": 16384, "max_context": 16384}, opts)
    assert row == {"note": "skipped: about 80 s per token"}


def test_markdown_table_shows_errors_and_leaves_out_what_nobody_measured():
    rows = [{"impl": "ours", "n": 1024, "ms": 2.0, "peak_mib": 25.0}, {"impl": "SDPA", "n": 1024, "ms": 3.0},
            {"impl": "0.1.9", "n": 1024, "error": "RuntimeError: a | b"}]  # fmt: skip
    md = common.markdown_table(rows, [("n", "N", ",")], [("ms", "ms", ".2f"), ("fwd_ms", "fwd", ".2f"),
                                                          ("peak_mib", "MiB", ".0f")], series="impl")  # fmt: skip
    assert md.splitlines()[0] == "| N | ours ms | SDPA ms | 0.1.9 ms | ours MiB |"
    assert md.splitlines()[2] == "| 1,024 | 2.00 | 3.00 | error: RuntimeError: a / b | 25 |"


def report(name: str, rows: list[dict], env: dict, out: Path) -> str:
    opts = SimpleNamespace(command=f"python benchmarks/run.py {name}")
    env = {"card": "Card X", "torch": "2.x", "triton": "3.x", "python": "3.12", "cpu_count": 16, "threads": 16,
           "malloc": "default", "date": "today", **env}  # fmt: skip
    run.write_report(registry.STUDIES[name], opts, env, rows, out, name)
    assert (out / f"{name}.png").read_bytes().startswith(PNG)
    return (out / f"{name}.md").read_text()


def test_cuda_graphs_report(tmp_path):
    """Ratios against dense in the same mode and against dense eager; a failed configuration shows its error."""
    rows = [{"config": "dense (SDPA)", "attention": "dense", "mode": "eager", "ms_per_step": 80.0, "tokens_per_s": 100,
             "loss": 5.0},
            {"config": "dense (SDPA)", "attention": "dense", "mode": "reduce-overhead", "ms_per_step": 40.0,
             "tokens_per_s": 200, "loss": 5.0},
            {"config": "hierarchical, block 512", "attention": "hierarchical", "mode": "eager", "ms_per_step": 64.0,
             "tokens_per_s": 125, "loss": 5.1},
            {"config": "hierarchical, block 512", "attention": "hierarchical", "mode": "reduce-overhead",
             "error": "RuntimeError: a | b"}]  # fmt: skip
    probe = {"backend": "flash attention", "kernels": ["flash_fwd_kernel", "flash_bwd_kernel"],
             "shape": "8x8x4096x64 bf16 causal"}  # fmt: skip
    md = report("cuda_graphs", rows, {"sdpa": probe}, tmp_path)
    assert "| hierarchical, block 512 | eager | 64.0 | 125 | 1.25x | 1.25x | 5.1000 |" in md
    assert "| dense (SDPA) | reduce-overhead | 40.0 | 200 | 1.00x | 2.00x | 5.0000 |" in md
    assert "| hierarchical, block 512 | reduce-overhead | error: RuntimeError: a / b | - |" in md
    assert "Card: **Card X**" in md and "`python benchmarks/run.py cuda_graphs`" in md
    assert ("SDPA backend (dense attention): **flash attention**; kernels of one forward and backward at "
            "8x8x4096x64 bf16 causal: `flash_fwd_kernel`, `flash_bwd_kernel`.") in md  # fmt: skip
    assert "**hierarchical eager 1.25x dense eager; fastest: dense (SDPA) reduce-overhead" in md


def test_attention_gpu_report(tmp_path):
    """A row per length with every implementation's time, forward-only time and memory; the headline compares
    ours with the baselines at the lengths it finds."""
    base = {"section": "layer", "causal": False, "n": 4096}
    rows = [{**base, "impl": "ours", "ms": 2.0, "fwd_ms": 1.0, "peak_mib": 25.0},
            {**base, "impl": "SDPA", "ms": 3.0, "fwd_ms": 0.5, "peak_mib": 22.0},
            {**base, "impl": "0.1.9", "ms": 6.0, "fwd_ms": 2.0, "peak_mib": 40.0}]  # fmt: skip
    md = report("attention_gpu", rows, {"sdpa": {"error": "RuntimeError: no kernel"}}, tmp_path)
    assert "| layer | no | 4,096 | 2.00 | 3.00 | 6.00 | 1.00 | 0.50 | 2.00 | 25 | 22 | 40 |" in md
    assert "SDPA backend: not recorded (RuntimeError: no kernel)." in md
    assert "4,096: 2.0 ms vs SDPA 1.50x, vs 0.1.9 3.00x" in md
    assert json.loads((tmp_path / "attention_gpu.json").read_text())["env"]["card"] == "Card X"


@pytest.mark.parametrize(
    "names, backend",
    [
        ([], "math"),
        (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "cudnn_generated_bprop"], "cuDNN attention"),
        (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>"], "flash attention"),
        (["fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "fmha_cutlassB_bf16"], "memory-efficient attention"),
        (["aten::_scaled_dot_product_flash_attention_for_cpu"], "flash attention"),
        (["aten::_scaled_dot_product_attention_math", "aten::_softmax"], "math"),
        (["some_attention_kernel"], "other"),
    ],
)
def test_sdpa_backend_is_named_from_its_kernels(names, backend):
    assert common.sdpa_backend_of(names) == backend


def test_sdpa_probe_reports_a_failure_instead_of_raising():
    probe = common.sdpa_probe("cpu", 1, 2, 64, -1)  # an impossible shape: fails on any host
    assert set(probe) == {"error"} and probe["error"]
    assert common.sdpa_line(probe) == f"SDPA backend: not recorded ({probe['error']})."
    assert common.sdpa_line(None) == "SDPA backend: not recorded."
    if not HAS_CUDA:
        assert set(common.sdpa_probe("cuda", 1, 2, 64, 16)) == {"error"}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_sdpa_probe_on_a_gpu():
    """On a GPU the probe sees SDPA's kernels, forward and backward, and names a fused backend."""
    probe = common.sdpa_probe("cuda", 2, 4, 1024, 64)
    assert "error" not in probe, probe
    assert probe["backend"] in ("cuDNN attention", "flash attention", "memory-efficient attention"), probe
    assert len(probe["kernels"]) >= 2 and probe["shape"] == "2x4x1024x64 bfloat16 causal"
