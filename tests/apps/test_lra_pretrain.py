"""ListOps Recipe B: masked-token pretraining on the training inputs, then a classifier started from its body."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from test_lra import SMALL_FLAGS, TINY, straight_and_interrupted

import h_transformer_1d
from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.lra import listops
from h_transformer_1d.apps.lra.config import LISTOPS, MASK, PRETRAIN, ListOpsConfig, PretrainConfig, build_classifier
from h_transformer_1d.apps.lra.train import load_body, mask_tokens, predict


def padded_batch(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """<cls> then random tokens, then padding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.full((len(lengths), width), listops.PAD)
    for b, n in enumerate(lengths):
        x[b, 0] = listops.CLS
        x[b, 1 : n + 1] = torch.randint(2, len(listops.VOCAB), (n,), generator=gen)
    return x, x != listops.PAD


def test_masking_never_touches_cls_or_padding():
    lengths = [1, 9, 25, 60]
    x, mask = padded_batch(lengths, 64)
    ever = torch.zeros_like(mask)
    for seed in range(200):
        inputs, masked = mask_tokens(x, mask, 0.1, torch.Generator().manual_seed(seed))
        assert not masked[:, 0].any() and not masked[~mask].any()  # never <cls>, never padding
        assert masked.sum(1).tolist() == [1, 1, 2, 6]  # round(10%) of the real tokens, at least one
        assert (inputs[masked] == MASK).all() and torch.equal(inputs[~masked], x[~masked])
        ever |= masked
    eligible = mask.clone()
    eligible[:, 0] = False
    assert torch.equal(ever, eligible)  # every real token can be drawn


def test_loss_only_on_masked_positions():
    """The logits at unmasked positions are NaN here: the loss stays finite, so it never reads them."""
    x, mask = padded_batch([30, 12], 40)
    cfg = PretrainConfig(mask_rate=0.1)
    seen = {}

    def model(inputs, mask):
        seen["inputs"] = inputs
        logits = torch.randn(*inputs.shape, MASK + 1, generator=torch.Generator().manual_seed(1))
        return logits.masked_fill((inputs != MASK)[..., None], float("nan"))

    logits, targets = predict(model, x, mask, None, cfg, seed=7)
    masked = seen["inputs"] == MASK
    assert logits.shape == (int(masked.sum()), MASK + 1) and torch.equal(targets, x[masked])
    loss = F.cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    again, _ = predict(model, x, mask, None, cfg, seed=7)
    torch.testing.assert_close(F.cross_entropy(again, targets), loss)  # the masks are a function of the seed


def test_pretrain_resumes_exactly_then_starts_a_classifier(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    assert main(["lra", "listops", "prepare", "--out", str(data), "--num-train", "40", "--num-val", "8",
                 "--num-test", "8", "--seed", "4", *SMALL_FLAGS]) == 0  # fmt: skip
    common = ["--data", str(data), *TINY, "--steps", "6", "--eval-every", "2", "--schedule", "linear",
              "--shuffle-operands"]  # fmt: skip
    straight_and_interrupted(tmp_path, monkeypatch, "pretrain", common, stop=5)

    def rows(run):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            return [[r[k] for k in ("step", "lr", "train_loss", "train_acc", "val_acc")] for r in csv.DictReader(f)]

    assert rows("resumed") == rows("straight") and len(rows("straight")) == 6
    a, b = (checkpoint.load(tmp_path / run, PRETRAIN).model for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "straight" / "results.json").read_text())["task"] == "listops-pretrain"
    loaded = h_transformer_1d.load(tmp_path / "straight")  # the public loader knows pretraining runs
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a) and not loaded.training

    # the classifier's body starts from the pretrained one; its head and norm start new
    cfg = ListOpsConfig(dim=32, depth=1, heads=2, dim_head=16, seq_len=64, block_size=4)
    model = build_classifier(cfg)
    load_body(model, tmp_path / "straight", cfg)
    state = model.state_dict()
    assert torch.equal(state["body.token_emb.weight"], a["body.token_emb.weight"][: len(listops.VOCAB)])
    body = [k for k in state if k.startswith("body.")]
    assert len(body) > 5 and all(torch.equal(state[k], a[k]) for k in body if k != "body.token_emb.weight")
    with pytest.raises(Exception, match="holds another body: dim=32"):
        load_body(build_classifier(ListOpsConfig(dim=64)), tmp_path / "straight", ListOpsConfig(dim=64))

    out = tmp_path / "finetuned"
    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY, "--steps", "2",
                 "--init-from", str(tmp_path / "straight"), "--pool", "mean"]) == 0  # fmt: skip
    assert checkpoint.load(out, LISTOPS).config.init_from == str(tmp_path / "straight")
    capsys.readouterr()
    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(tmp_path / "x"), *TINY,
                 "--steps", "2", "--init-from", str(tmp_path / "straight"), "--dim", "64"]) == 2  # fmt: skip
    assert "holds another body: dim=32 (asked: --dim 64)" in capsys.readouterr().err
