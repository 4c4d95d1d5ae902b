"""ListOps Recipe A: operand shuffling, batches bucketed by length, decay to zero, epochs as the budget, the
best-validation checkpoint."""

import csv
import itertools
import json
import math

import pytest
import torch
from test_lra import SMALL_FLAGS, TINY

from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.core.training import warmup_to_zero
from h_transformer_1d.apps.lra import listops
from h_transformer_1d.apps.lra.config import LISTOPS, ListOpsConfig, upgrade
from h_transformer_1d.apps.lra.data import Batches, epoch_order, load_split, shuffle_operands
from h_transformer_1d.apps.lra.listops import Bounds
from h_transformer_1d.apps.lra.train import learning_rate

DEEP = Bounds(max_depth=5, max_args=6, min_length=20, max_length=120)


def canonical(tree):
    """A tree with every operator's operands in a fixed order: equal for trees that differ only in that order."""
    if isinstance(tree, int):
        return str(tree)
    operator, children = tree
    return f"{operator} {' '.join(sorted(canonical(child) for child in children))} ]"


def texts(x: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return [" ".join(listops.VOCAB[i] for i in row[m].tolist() if i != listops.CLS) for row, m in zip(x, mask)]


def test_operand_shuffling_keeps_every_label_and_tree(tmp_path):
    listops.write_splits(tmp_path, {"train": 300, "val": 1, "test": 1}, seed=5, bounds=DEEP)
    split = load_split(tmp_path, "train")
    rows = list(listops.read_split(tmp_path / listops.SPLITS["train"]))
    indices = torch.arange(len(split))
    plain = texts(*split.batch(indices, seq_len=200, cls=True, multiple=16))
    seen = {}
    for seed in (0, 1):
        x, mask = split.batch(indices, seq_len=200, cls=True, multiple=16, shuffle=torch.Generator().manual_seed(seed))
        assert (x[:, 0] == listops.CLS).all() and (x[~mask] == listops.PAD).all()
        assert mask.sum(1).tolist() == [n + 1 for n in split.lengths.tolist()]
        seen[seed] = texts(x, mask)
        for shuffled, original, (text, label) in zip(seen[seed], plain, rows):
            assert listops.evaluate(shuffled) == label  # the project's own evaluator
            assert canonical(listops.parse(shuffled)) == canonical(listops.parse(text))  # only operand order moved
        changed = sum(a != b for a, b in zip(seen[seed], plain))
        assert changed >= 0.9 * len(rows), changed
    assert seen[0] != seen[1]
    again = split.batch(indices, seq_len=200, cls=True, multiple=16, shuffle=torch.Generator().manual_seed(1))
    assert texts(*again) == seen[1]  # a seeded generator: the same shuffles after --resume


def test_operand_shuffling_reaches_every_order():
    """[MIN 1 [MAX 2 3 ] 4 ]: 3! orders at the top times 2 inside, each with its subtree kept whole."""
    ids = listops.encode("[MIN 1 [MAX 2 3 ] 4 ]")
    x = torch.tensor([ids + [listops.PAD] * 3] * 400)
    mask = x != listops.PAD
    out = shuffle_operands(x, mask, torch.Generator().manual_seed(0))
    orders = set(texts(out, mask))
    assert len(orders) == 12
    assert all(listops.evaluate(t) == 1 and t.startswith("[MIN") and t.endswith("]") for t in orders)
    assert (out[:, len(ids) :] == listops.PAD).all()


def test_bucketed_batches_cover_each_epoch_once_with_little_padding():
    lengths = torch.randint(500, 2000, (1000,), generator=torch.Generator().manual_seed(0))
    bucketed, random_batches = Batches(lengths, 32, seed=3, window=8), Batches(lengths, 32, seed=3, window=1)
    for epoch in (0, 1):
        batches = bucketed.epoch(epoch)
        assert batches.shape == (1000 // 32, 32)
        assert sorted(batches.flatten().tolist()) == sorted(epoch_order(1000, 3, epoch)[: 31 * 32].tolist())
        # random batches pad to their longest; bucketed ones to a near neighbour's length
        padding = {name: float((lengths[b].max(1).values[:, None] - lengths[b]).float().mean())
                   for name, b in (("bucketed", batches), ("random", random_batches.epoch(epoch)))}  # fmt: skip
        assert padding["bucketed"] < padding["random"] / 5, padding
    assert not torch.equal(bucketed.epoch(0), bucketed.epoch(1))
    # the order is a function of the seed and the epoch (resume), and window 1 is the earlier random batches
    assert torch.equal(Batches(lengths, 32, seed=3, window=8).indices(40), bucketed.indices(40))
    assert torch.equal(random_batches.indices(33), epoch_order(1000, 3, 1)[32:64])
    # the longest examples do not all come at the end of the epoch: the batches are taken in a random order
    longest = lengths[bucketed.epoch(0)].max(1).values
    assert not torch.equal(longest, longest.sort().values)


def test_schedules_decay_to_zero_after_the_last_step():
    for shape in ("linear", "cosine"):
        lrs = [warmup_to_zero(step, 1.0, 10, 110, shape) for step in range(1, 111)]
        assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[10] == 1.0  # warmup, then the peak
        assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and 0 < lrs[-1] < 0.02
        assert warmup_to_zero(111, 1.0, 10, 110, shape) == pytest.approx(0.0, abs=1e-12)
        assert lrs[60] == pytest.approx(0.5)  # halfway through the decay, for both shapes
    assert warmup_to_zero(35, 1.0, 10, 110, "linear") == pytest.approx(0.76)
    cfg = ListOpsConfig(lr=2e-3, warmup_steps=100, steps=1100, schedule="cosine")
    assert learning_rate(cfg, 100) == pytest.approx(2e-3) and learning_rate(cfg, 600) == pytest.approx(
        1e-3 * (1 + math.cos(math.pi * 499 / 1000))
    )
    assert learning_rate(ListOpsConfig(schedule="rsqrt"), 4000) == pytest.approx(1.5e-4 / 2)  # LRA's, the default


def test_new_settings_and_earlier_checkpoints():
    cfg = ListOpsConfig()
    assert (cfg.schedule, cfg.epochs, cfg.shuffle_operands, cfg.bucket) == ("rsqrt", 0.0, False, 50)
    # a configuration saved before these settings existed resumes as it trained: random batches, no shuffling
    stored = {k: v for k, v in ListOpsConfig().__dict__.items()
              if k not in ("schedule", "epochs", "shuffle_operands", "bucket", "max_data_bytes", "kv_heads")}  # fmt: skip
    values = upgrade(stored)
    assert values["kv_heads"] == 0  # every head had its keys and values
    assert (values["schedule"], values["epochs"], values["shuffle_operands"], values["bucket"]) == (
        "rsqrt", 0.0, False, 1
    )  # fmt: skip


def test_epochs_budget_best_checkpoint_end_to_end(tmp_path, capsys):
    """--epochs sets the steps; the best validation's save is kept in best/ and its test accuracy reported."""
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["lra", "listops", "prepare", "--out", str(data), "--num-train", "36", "--num-val", "16",
                 "--num-test", "16", "--seed", "3", *SMALL_FLAGS]) == 0  # fmt: skip
    recipe = ["--pool", "mean", "--schedule", "linear", "--shuffle-operands", "--weight-decay", "0.01"]
    # exclusive budgets: both flags, or both keys of one TOML file
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 4\nepochs = 2\n")
    for budget in (["--steps", "3", "--epochs", "2"], ["--config", str(toml)]):
        assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY, *budget]) == 2
        assert "--steps and --epochs are exclusive" in capsys.readouterr().err
    toml.write_text("steps = 4\n")  # a flag's budget replaces the file's
    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY, *recipe,
                 "--config", str(toml), "--epochs", "2", "--eval-every", "3", "--lr", "0.01"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == math.ceil(2 * 36 / 8) == 9 and results["epochs"] == 2.0
    assert results["config"]["epochs"] == 2.0 and results["config"]["steps"] == 9
    with open(out / "metrics.csv", newline="") as f:
        validations = [(float(r["val_acc"]), int(r["step"])) for r in csv.DictReader(f) if r["val_acc"]]
    assert [step for _, step in validations] == [3, 6, 9]
    best_acc = max(acc for acc, _ in validations)
    best_step = next(step for acc, step in validations if acc == best_acc)  # the earliest on a tie
    assert (results["best_val_accuracy"], results["best_val_step"]) == (best_acc, best_step)
    saved = checkpoint.load(out / "best", LISTOPS)
    assert saved.step == best_step and results["best_checkpoint"] == f"best/checkpoints/step-{best_step:06d}"
    assert 0 <= results["best_test_accuracy"] <= 1
    capsys.readouterr()
    assert main(["lra", "listops", "evaluate", "--checkpoint", str(out / "best")]) == 0
    assert f"test accuracy: {results['best_test_accuracy']:.4f}" in capsys.readouterr().out
    # --resume --steps trains on from the epochs' budget
    assert main(["lra", "listops", "train", "--out", str(out), "--resume", "--steps", "10"]) == 0
    stored = checkpoint.load(out, LISTOPS).config
    assert (stored.steps, stored.epochs) == (10, 0.0)
