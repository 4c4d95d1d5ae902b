"""The command line's shared vocabulary: flags both tools share, bench's flags, --version, --device."""

import argparse

import pytest
import torch

from h_transformer_1d.apps import cli
from h_transformer_1d.apps.bench import BENCH_FLAGS
from h_transformer_1d.apps.config import Config
from h_transformer_1d.apps.core.config import SHARED, ConfigError, fields_of, flag
from h_transformer_1d.apps.core.runtime import resolve_device
from h_transformer_1d.apps.lra.config import ListOpsConfig


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_both_train_commands_speak_the_same_flags():
    parser = cli.build_parser()
    lm, lra = subparser(parser, "train"), subparser(parser, "lra", "listops", "train")
    common = {"--steps", "--lr", "--warmup-steps", "--batch-size", "--eval-every", "--out", "--seed", "--device",
              "--precision", "--resume", "--config", "--data", "--dropout", "--attn-dropout", "--weight-decay",
              "--grad-clip", "--dim", "--depth", "--heads", "--dim-head", "--block-size", "--seq-len", "--ff-mult",
              "--attention"}  # fmt: skip
    assert common <= options(lm) and common <= options(lra)
    assert "--max-steps" not in options(lm) | options(lra)
    # an idea both configurations hold is declared once: the same flag, check and help (a note may follow);
    # --data alone says what each application reads
    both = set(fields_of(Config)) & set(fields_of(ListOpsConfig)) - {"data"}
    assert both == set(SHARED)
    for name in both:
        a, b = fields_of(Config)[name].metadata, fields_of(ListOpsConfig)[name].metadata
        assert a["checks"] == b["checks"] and a["choices"] == b["choices"], name
        assert a["help"].startswith(SHARED[name][0]) and b["help"].startswith(SHARED[name][0]), name
    for command in (("evaluate",), ("lra", "listops", "evaluate")):
        assert {"--checkpoint", "--split", "--batch-size", "--data", "--device", "--precision"} <= options(
            subparser(parser, *command)
        )


def test_bench_offers_only_flags_that_change_the_time_of_a_step():
    bench = options(subparser(cli.build_parser(), "bench"))
    model = {flag(name) for name, f in fields_of(Config).items() if f.metadata["group"] == "model"}
    allowed = {"-h", "--help", "--preset", "--config", "--steps", *model, *(flag(name) for name in BENCH_FLAGS)}
    allowed |= {f"--no-{name[2:]}" for name in allowed}  # the negations of the boolean flags
    assert bench <= allowed
    for meaningless in ("--lr", "--warmup-steps", "--weight-decay", "--grad-clip", "--seed", "--fsdp", "--out",
                        "--resume", "--data", "--eval-every", "--eval-batches", "--sample-every"):  # fmt: skip
        assert meaningless not in bench


def test_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"h-transformer-1d {cli.package_version()}"

    def not_installed(name):
        raise cli.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    from h_transformer_1d import __version__

    assert cli.package_version() == __version__


def test_device_names(monkeypatch, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device mps: mps is not available on this machine"):
        resolve_device("mps")
    assert cli.main(["train", "--device", "mps", "--out", "o"]) == 2
    assert "--device mps: mps is not available on this machine" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda:1: cuda is not available"):
            resolve_device("cuda:1")
