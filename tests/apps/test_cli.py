"""The `h-transformer-1d` command end to end on the CPU, with a tiny model and a small corpus."""

import csv
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import h_transformer_1d
from h_transformer_1d import AutoregressiveWrapper
from h_transformer_1d.apps import data
from h_transformer_1d.apps.cli import build_parser, main
from h_transformer_1d.apps.config import LM, PRESETS, Config, build_model, resolve
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.core.checkpoint import CheckpointError
from h_transformer_1d.apps.core.config import ConfigError, fields_of, flag
from h_transformer_1d.apps.train import learning_rate
from h_transformer_1d.model import cache as cache_module
from h_transformer_1d.model.cache import StaticDecoder

TINY = [
    "--dim",
    "32",
    "--depth",
    "1",
    "--heads",
    "2",
    "--dim-head",
    "16",
    "--seq-len",
    "64",
    "--block-size",
    "16",
    "--batch-size",
    "4",
    "--eval-batches",
    "2",
    "--sample-every",
    "0",
    "--device",
    "cpu",
]


def make_text(n_lines: int = 1500, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = ["def", "class", "return", "import", "self", "for", "in", "if", "else", "while", "lambda", "None"]
    return "\n".join(
        "    " * rng.randint(0, 2) + " ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + ":"
        for _ in range(n_lines)
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(make_text())
    return path


def train(out: Path, corpus: Path, *extra: str) -> int:
    return main(["train", "--data", str(corpus), "--out", str(out), *TINY, *extra])


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    torch.set_num_threads(1)
    assert (
        train(out, corpus, "--steps", "6", "--eval-every", "3", "--sample-every", "3", "--sample-length", "16") == 0
    )
    return out


# --- help and flags -------------------------------------------------------------------------------


def test_help_explains_every_flag(capsys):
    parser = build_parser()
    for command, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in fields_of(Config):
        assert flag(name) in text


def test_module_entry_point_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "h_transformer_1d", "--help"], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert out.returncode == 0
    assert "train" in out.stdout and "evaluate" in out.stdout and "generate" in out.stdout and "bench" in out.stdout
    assert "--version" in out.stdout


def test_presets():
    tiny = sum(p.numel() for p in build_model(PRESETS["tiny"]).parameters())
    assert 1e6 <= tiny <= 3e6
    base = PRESETS["base"]
    assert (base.depth, base.dim, base.heads, base.dim_head, base.block_size, base.seq_len) == (
        12,
        512,
        8,
        64,
        128,
        8192,
    )
    assert base.shift_tokens


def test_config_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "base"\ndim = 256\nseq-len = 1024\nlr = 1\n')
    cfg, preset = resolve({"config": str(toml), "dim": 128})
    assert preset == "base" and cfg.dim == 128 and cfg.seq_len == 1024 and cfg.depth == 12 and cfg.lr == 1.0
    toml.write_text("dimm = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'dimm'"):
        resolve({"config": str(toml)})
    toml.write_text('dim = "wide"\n')
    with pytest.raises(ConfigError, match="dim must be an integer"):
        resolve({"config": str(toml)})


def test_learning_rate_schedule():
    cfg = PRESETS["tiny"]
    assert learning_rate(cfg, cfg.warmup_steps) == pytest.approx(cfg.lr)
    assert learning_rate(cfg, 1) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert learning_rate(cfg, cfg.steps) == pytest.approx(cfg.lr / 10)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dim", "0"], "--dim must be a positive integer"),
        (["--block-size", "24"], "--block-size must be a power of two"),
        (["--dim-head", "15"], "--dim-head must be even"),
        (["--batch-size", "6", "--grad-accum", "4"], "--batch-size must be divisible by --grad-accum"),
        (["--lr", "-1"], "--lr must be a number > 0"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--device", "nonsense"], "--device must be"),
        (["--config", "/nonexistent.toml"], "--config /nonexistent.toml: cannot read it"),
    ],
)
def test_bad_values_give_clear_errors(args, message, corpus, tmp_path, capsys):
    assert train(tmp_path / "out", corpus, *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("h-transformer-1d train: error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--preset", "huge"], ["--lr", "fast"], ["--frobnicate"], ["--precision", "fp8"]])
def test_bad_flags_are_argparse_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", *args])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


# --- data -----------------------------------------------------------------------------------------


def test_missing_or_too_small_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "n"), *TINY]) == 1
    assert "--data" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("x" * 500)
    assert main(["train", "--data", str(small), "--out", str(tmp_path / "o"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "--seq-len 64 needs at least 65" in err and "Traceback" not in err


def test_file_gz_zip_split_90_5_5(tmp_path):
    payload = bytes(range(256)) * 40
    (tmp_path / "a.txt").write_bytes(payload)
    with gzip.open(tmp_path / "a.txt.gz", "wb") as f:
        f.write(payload)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("enwik8", payload)
    for name in ("a.txt", "a.txt.gz", "a.zip"):
        corpus = data.load_corpus(str(tmp_path / name))
        assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (9216, 512, 512)
        assert bytes(corpus.train.tolist()) + bytes(corpus.val.tolist()) + bytes(corpus.test.tolist()) == payload
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.writestr("a", "x")
        z.writestr("b", "y")
    with pytest.raises(data.DataError, match="exactly one file"):
        data.load_corpus(str(tmp_path / "two.zip"))


def test_directory_split_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"{i:02d}.txt").write_text(f"<{i:02d}>")
    (tmp_path / ".hidden").write_text("never")
    corpus = data.load_corpus(str(tmp_path))
    assert bytes(corpus.val.tolist()) == b"<18><38>"
    assert bytes(corpus.test.tolist()) == b"<19><39>"
    assert len(corpus.train) == 36 * 4


def test_default_corpus_is_the_standard_library():
    _, files = data.stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    corpus = data.load_corpus(None)
    assert len(corpus.val) > 0 and len(corpus.test) > 0 and len(corpus.train) > 10 * len(corpus.val)


def test_batches_depend_on_seed_and_step_only():
    tokens = torch.arange(1000) % 256
    tokens = tokens.to(torch.uint8)
    a = data.train_batch(tokens, 16, 8, seed=1, step=5)
    assert torch.equal(a, data.train_batch(tokens, 16, 8, seed=1, step=5))
    assert not torch.equal(a, data.train_batch(tokens, 16, 8, seed=1, step=6))
    assert a.shape == (8, 17) and a.dtype == torch.uint8
    generator = torch.Generator().manual_seed(2**32 + 5)  # the starts train_batch draws for (seed 1, step 5)
    starts = torch.randint(len(tokens) - 16, (8,), generator=generator)
    assert torch.equal(a, tokens[starts[:, None] + torch.arange(17)])  # consecutive bytes from each start
    starts = data.eval_starts(tokens, 16)
    assert starts[1] - starts[0] == 16 and starts[-1] + 17 <= len(tokens)


# --- train, evaluate, generate --------------------------------------------------------------------


def test_train_writes_checkpoint_metrics_and_plot(trained, capsys):
    for name in ("metrics.csv", "curves.png"):
        assert (trained / name).is_file(), name
    saves = trained / checkpoint.SAVES
    assert sorted(p.name for p in saves.iterdir()) == ["step-000003", "step-000006"]  # the last 2 saves
    assert checkpoint.locate(trained) == saves / "step-000006"
    for name in (*checkpoint.FILES, checkpoint.MANIFEST):
        assert (saves / "step-000006" / name).is_file(), name
    log = rows(trained)
    assert [int(r["step"]) for r in log] == list(range(1, 7))
    assert [bool(r["val_bpb"]) for r in log] == [False, False, True, False, False, True]
    assert all(0 < float(r["train_bpb"]) < 10 for r in log)
    ckpt = checkpoint.load(trained, LM, training=True)
    assert ckpt.step == 6 and ckpt.config.dim == 32


def test_evaluate_and_generate(trained, capsys):
    assert main(["evaluate", "--checkpoint", str(trained), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    bpb = float(out.split("test bits per byte:")[1].split()[0])
    assert 0 < bpb < 9
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "def ", "--length", "20"]) == 0
    assert len(capsys.readouterr().out) > 0


def test_load_returns_the_trained_language_model(trained, tmp_path):
    model = h_transformer_1d.load(trained)
    assert isinstance(model, AutoregressiveWrapper) and not model.training
    saved = checkpoint.load(trained, LM)
    assert all(torch.equal(t, saved.model[name]) for name, t in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.tensor([list(b"def f(x):")])
    assert model.net(x).shape == (1, 9, 256) and model.generate(x, 4).shape == (1, 4)
    assert h_transformer_1d.load(str(trained), device=torch.device("cpu")).net.dim == 32
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        h_transformer_1d.load(tmp_path / "none")
    with pytest.raises(ValueError, match="is not a complete checkpoint: missing model.safetensors, config.json"):
        h_transformer_1d.load(tmp_path)


def test_checkpoints_of_the_earlier_version_still_load_and_resume(trained, tmp_path):
    """Before `--steps`, the config held `max_steps`, no `task`, and one dropout for attention and feed-forward;
    the four files lay directly in the run directory, without a manifest."""
    old = tmp_path / "old"
    old.mkdir()
    for name in checkpoint.FILES:
        (old / name).write_bytes((checkpoint.locate(trained) / name).read_bytes())
    record = json.loads((old / "config.json").read_text())
    del record["task"]
    cfg = record["config"]
    cfg["max_steps"] = cfg.pop("steps")
    del cfg["attn_dropout"], cfg["kv_heads"]
    cfg["dropout"] = 0.25
    (old / "config.json").write_text(json.dumps(record))
    saved = checkpoint.load(old, LM)
    assert (saved.config.steps, saved.config.dropout, saved.config.attn_dropout) == (6, 0.25, 0.25)
    assert saved.config.kv_heads == 0  # keys and values had every head
    assert isinstance(h_transformer_1d.load(old), AutoregressiveWrapper)
    assert main(["train", "--out", str(old), "--resume", "--steps", "7", "--eval-every", "7"]) == 0
    assert checkpoint.load(old, LM).step == 7 and checkpoint.locate(old) == old / checkpoint.SAVES / "step-000007"


def test_kv_heads_flag_trains_resumes_and_decodes(tmp_path, capsys):
    """--kv-heads makes every layer grouped-query (its projection smaller), survives --resume and decodes; a value
    that does not divide --heads is refused naming both flags."""
    out = tmp_path / "gqa"
    args = ["train", *TINY, "--heads", "4", "--kv-heads", "2", "--out", str(out)]
    assert main([*args, "--steps", "2", "--eval-every", "2"]) == 0
    model = h_transformer_1d.load(out)
    attention = [m for m in model.modules() if hasattr(m, "kv_heads")]
    assert attention and all((m.heads, m.kv_heads) == (4, 2) for m in attention)
    assert all(m.to_qkv.out_features == (4 + 2 * 2) * m.dim_head for m in attention)
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--eval-every", "3"]) == 0
    assert checkpoint.load(out, LM).config.kv_heads == 2
    assert main(["train", "--out", str(out), "--resume", "--kv-heads", "1", "--steps", "4"]) == 2
    assert "kv_heads=2 (asked: --kv-heads 1)" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--length", "5", "--device", "cpu"]) == 0
    assert main(["train", *TINY, "--heads", "4", "--kv-heads", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--kv-heads must divide --heads = 4 (or be 0), got 3" in capsys.readouterr().err


@pytest.mark.skipif(cache_module.torch_version() < (2, 13), reason="compile on the CPU needs torch >= 2.13")
def test_generate_with_compile(trained, capsys, monkeypatch):
    made = []
    init = StaticDecoder.__init__
    monkeypatch.setattr(StaticDecoder, "__init__", lambda self, *a, **kw: made.append(kw) or init(self, *a, **kw))
    args = ["generate", "--checkpoint", str(trained), "--prompt", "def ", "--length", "20", "--device", "cpu"]
    assert main([*args, "--compile", "--temperature", "0"]) == 0
    assert len(made) == 1 and made[0]["compile"] is True
    compiled = capsys.readouterr().out
    assert main([*args, "--temperature", "0"]) == 0 and len(made) == 1  # on the CPU: eager steps otherwise
    assert compiled == capsys.readouterr().out and len(compiled) > 1  # greedy: the same text
    monkeypatch.setattr(cache_module, "torch_version", lambda: (2, 11))
    assert main([*args, "--compile"]) == 2 and len(made) == 1
    assert "--compile: compile=True on the CPU needs torch >= 2.13" in capsys.readouterr().err


def test_bench_prints_a_table(capsys):
    assert main(["bench", *TINY[: TINY.index("--eval-batches")], "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "hierarchical" in out and "dense" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if len(line.split()) == 4}
    speeds = [float(rows[kind][2].replace(",", "")) for kind in ("hierarchical", "dense")]
    ratio = next(line for line in out.splitlines() if line.startswith("hierarchical / dense tokens/s:"))
    assert float(ratio.split()[-1].rstrip("x")) == pytest.approx(speeds[0] / speeds[1], abs=0.006)


# --- checkpoints and resume -----------------------------------------------------------------------


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(corpus, tmp_path, monkeypatch, capsys):
    common = ["--steps", "8", "--eval-every", "4", "--dropout", "0.1", "--grad-accum", "2"]
    assert train(tmp_path / "straight", corpus, *common) == 0

    real_batch = data.train_batch

    def interrupted_batch(tokens, seq_len, batch_size, seed, step):
        if step == 6:
            raise KeyboardInterrupt
        return real_batch(tokens, seq_len, batch_size, seed, step)

    monkeypatch.setattr(data, "train_batch", interrupted_batch)
    assert train(tmp_path / "resumed", corpus, *common) == 130
    assert checkpoint.load(tmp_path / "resumed", LM).step == 4
    monkeypatch.setattr(data, "train_batch", real_batch)
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume"]) == 0

    keys = ("step", "tokens", "lr", "train_bpb", "val_bpb")
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    a = checkpoint.load(tmp_path / "straight", LM, training=True)
    b = checkpoint.load(tmp_path / "resumed", LM, training=True)
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def snapshot(directory: Path) -> dict:
    """Every file under directory (with TensorBoard installed, the run also holds a folder of event files)."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_resume_with_another_model_is_refused_and_touches_nothing(trained, tmp_path, capsys):
    before = snapshot(trained)
    assert main(["train", "--out", str(trained), "--resume", "--dim", "64", "--steps", "9"]) == 2
    err = capsys.readouterr().err
    assert "dim=32" in err and "--dim 64" in err and "Traceback" not in err
    assert main(["train", "--out", str(trained), "--resume", "--preset", "tiny"]) == 2
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(trained), "--data", "x", *TINY]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert snapshot(trained) == before


def test_missing_checkpoint_for_evaluate(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_error_exit_has_no_traceback_in_a_subprocess(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "h_transformer_1d", "generate", "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 1
    assert "error:" in out.stderr and "Traceback" not in out.stderr


# the loop reads a loss once the next step is queued, and at once on a step that saves: a NaN on a step
# that saves (4 of 2), on the one before (3 of 2), on one read late (5 of 4, read while queueing 6)
@pytest.mark.parametrize("first_nan,eval_every,kept", [(3, 2, 2), (4, 2, 2), (5, 4, 4)])
def test_nonfinite_loss_stops_before_the_next_checkpoint(corpus, tmp_path, monkeypatch, capsys, first_nan, eval_every,
                                                         kept):  # fmt: skip
    from h_transformer_1d.apps import train as train_module

    real = train_module.build_model
    seen = [0]

    def poisoned(cfg):
        model = real(cfg)

        def hook(module, args, output):
            if torch.is_grad_enabled():
                seen[0] += 1
                if seen[0] >= first_nan:
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", poisoned)
    out = tmp_path / "run"
    assert train(out, corpus, "--steps", "8", "--eval-every", str(eval_every)) == 1
    err = capsys.readouterr().err
    assert f"step {first_nan}: the training loss is nan (not finite)" in err and f"checkpoint of step {kept}" in err
    assert "Traceback" not in err
    saved = checkpoint.load(out, LM, training=True)
    assert saved.step == kept and all(torch.isfinite(t).all() for t in saved.model.values())
    log = rows(out)
    assert {int(r["step"]) for r in log} <= set(range(1, first_nan)) and all(float(r["train_bpb"]) < 99 for r in log)


def test_adamw_is_fused_only_when_every_parameter_is_on_a_gpu():
    from h_transformer_1d.apps.core.training import adamw, decay_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    groups = decay_groups(model, 0.1)
    opt = adamw(groups, lr=1e-3, betas=(0.9, 0.95))
    assert not opt.defaults["fused"] and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    assert not adamw(list(model.parameters()), lr=1e-3).defaults["fused"]
    if torch.cuda.is_available():
        assert adamw(decay_groups(model.cuda(), 0.1), lr=1e-3).defaults["fused"]
        mixed = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="cuda"))]
        assert not adamw(mixed, lr=1e-3).defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pending_loss_reads_the_value_it_was_given_on_gpu():
    from h_transformer_1d.apps.core.training import PendingLoss

    loss = torch.tensor(1.5, device="cuda")
    pending = PendingLoss(loss)
    loss.add_(1.0)  # queued after the copy: must not reach the value read
    assert pending.host.is_pinned() and pending.value() == 1.5


def test_tokens_per_s_is_each_steps_share_of_the_time_between_loss_reads(corpus, tmp_path, monkeypatch):
    """On a fake clock where reading a loss takes one second (the device finishing one step) and nothing
    else takes time, every row says one step's tokens per second: rows read together on a step that
    evaluates share the interval, and evaluations and samples are left out."""
    from types import SimpleNamespace

    from h_transformer_1d.apps import train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    real_value = train_module.PendingLoss.value

    def one_second(self):
        clock[0] += 1.0
        return real_value(self)

    monkeypatch.setattr(train_module.PendingLoss, "value", one_second)
    out = tmp_path / "run"
    assert (
        train(out, corpus, "--steps", "7", "--eval-every", "3", "--sample-every", "2", "--sample-length", "4") == 0
    )
    cfg = checkpoint.load(out, LM).config
    log = rows(out)
    assert [int(r["step"]) for r in log] == list(range(1, 8))
    assert [float(r["tokens_per_s"]) for r in log] == [pytest.approx(cfg.batch_size * cfg.seq_len, rel=1e-5)] * 7
    elapsed = [float(r["elapsed_s"]) for r in log]
    assert elapsed == sorted(elapsed) and elapsed[-1] == 7
