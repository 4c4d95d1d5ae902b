"""Long Range Arena ListOps: generator, evaluator, tokens, the classifier, and the command end to end on the CPU."""

import csv
import json
import random

import numpy as np
import pytest
import torch

import h_transformer_1d
from h_transformer_1d import HTransformer1D
from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.lra import listops
from h_transformer_1d.apps.lra.config import LISTOPS, ListOpsConfig
from h_transformer_1d.apps.lra.listops import Bounds, ListOpsError
from h_transformer_1d.apps.lra.model import SequenceClassifier
from h_transformer_1d.apps.lra.train import learning_rate, load_split

SMALL = Bounds(max_depth=4, max_args=5, min_length=10, max_length=40)
SMALL_FLAGS = ["--min-length", "10", "--max-length", "60", "--workers", "1"]
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", "64", "--block-size", "4"]
TINY += ["--batch-size", "8", "--warmup-steps", "2", "--device", "cpu"]


def depth(tree) -> int:
    return 1 if isinstance(tree, int) else 1 + max(depth(child) for child in tree[1])


def nodes(tree):
    yield tree
    if not isinstance(tree, int):
        for child in tree[1]:
            yield from nodes(child)


# --- the text format and the evaluator ------------------------------------------------------------


def test_lra_text_format():
    assert listops.to_text(("[MAX", [2, 9])) == "( ( ( [MAX 2 ) 9 ) ] )"
    nested = ("[MIN", [("[MAX", [2, 9]), 4])
    assert listops.to_text(nested) == "( ( ( [MIN ( ( ( [MAX 2 ) 9 ) ] ) ) 4 ) ] )"
    three = ("[SM", [1, ("[MED", [3, 8]), 7])
    assert listops.to_text(three) == "( ( ( ( [SM 1 ) ( ( ( [MED 3 ) 8 ) ] ) ) 7 ) ] )"
    for tree in (nested, three):
        assert listops.parse(listops.to_text(tree)) == tree


@pytest.mark.parametrize(
    "text, label",
    [
        ("( ( ( [MAX 2 ) 9 ) ] )", 9),
        ("( ( ( [MIN ( ( ( [MAX 2 ) 9 ) ] ) ) 4 ) ] )", 4),  # MIN(MAX(2, 9), 4)
        ("[MIN 7 ]", 7),
        ("[MED 3 1 7 ]", 3),
        ("[MED 3 8 ]", 5),  # even count: int(np.median) = int(5.5)
        ("[MED 1 2 3 4 ]", 2),  # int(2.5)
        ("[MED 9 9 0 0 ]", 4),  # int(4.5)
        ("[MED 6 2 ]", 4),  # exactly 4.0
        ("[SM 5 7 9 ]", 1),  # 21 mod 10
        ("[SM 0 0 ]", 0),
        ("[SM [MAX 9 1 ] [MIN 8 3 ] 4 ]", 6),  # 9 + 3 + 4 = 16
        ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5),  # the LRA paper's example
        ("[MED [SM 9 9 ] [MAX 0 1 ] [MIN 7 [MED 4 5 ] ] 2 ]", 3),  # MED(8, 1, 4, 2) = int(3.0)
        ("( ( ( [SM ( ( ( [SM 9 ) 9 ) ] ) ) ( ( ( [SM 9 ) 9 ) ] ) ) ] )", 6),  # 8 + 8 = 16
    ],
)
def test_evaluator_on_hand_worked_expressions(text, label):
    assert listops.evaluate(text) == label


def test_median_is_lras_int_of_numpy_median():
    rng = random.Random(0)
    for _ in range(500):
        args = [rng.randrange(10) for _ in range(rng.randint(2, 10))]
        assert listops.apply("[MED", args) == int(np.median(args))
        assert listops.apply("[SM", args) == int(np.sum(args) % 10)


@pytest.mark.parametrize("text", ["[MAX 2 9", "[MAX 2 9 ] ]", "[FOO 1 ]", "2 3", "[MAX ]", "", "[MAX 12 ]"])
def test_malformed_expressions_are_refused(text):
    with pytest.raises(ListOpsError):
        listops.evaluate(text)


def test_tokens():
    assert len(listops.VOCAB) == 17 and listops.VOCAB[listops.PAD] == "<pad>" and listops.VOCAB[listops.CLS] == "<cls>"
    text = "( ( ( [MAX 2 ) 9 ) ] )"
    assert listops.tokens(text) == ["[MAX", "2", "9", "]"]
    ids = listops.encode(text)
    assert [listops.VOCAB[i] for i in ids] == ["[MAX", "2", "9", "]"]
    assert listops.encode(text, cls=True) == [listops.CLS, *ids]
    assert sorted(listops.TOKEN_IDS.values()) == list(range(2, 17))  # no text maps to <pad> or <cls>
    with pytest.raises(ListOpsError, match="unknown token"):
        listops.encode("[MAX 2 <cls> ]")


# --- the generator --------------------------------------------------------------------------------


def test_generator_is_deterministic_and_prefix_stable():
    first = list(listops.generate(120, seed=3, bounds=SMALL))
    assert list(listops.generate(120, seed=3, bounds=SMALL)) == first
    assert list(listops.generate(40, seed=3, bounds=SMALL)) == first[:40]
    assert list(listops.generate(120, seed=4, bounds=SMALL)) != first


def test_generator_result_does_not_depend_on_workers():
    assert list(listops.generate(700, seed=1, bounds=SMALL, workers=2)) == list(
        listops.generate(700, seed=1, bounds=SMALL)
    )


def test_generator_constraints():
    examples = list(listops.generate(600, seed=0, bounds=SMALL))
    texts = [text for text, _ in examples]
    assert len(set(texts)) == len(texts)
    operators, labels = set(), set()
    for text, label in examples:
        tree = listops.parse(text)
        assert listops.to_text(tree) == text
        assert label == listops.evaluate(text) and 0 <= label <= 9
        assert SMALL.min_length < len(listops.tokens(text)) < SMALL.max_length
        assert depth(tree) <= SMALL.max_depth
        for node in nodes(tree):
            if not isinstance(node, int):
                operators.add(node[0])
                assert 2 <= len(node[1]) <= SMALL.max_args
        labels.add(label)
    assert operators == set(listops.OPERATORS) and len(labels) >= 8


def test_generator_default_bounds_are_lras():
    assert Bounds() == Bounds(max_depth=10, max_args=10, min_length=500, max_length=2000)
    for text, label in listops.generate(3, seed=0):
        tree = listops.parse(text)
        assert 500 < len(listops.tokens(text)) < 2000 and depth(tree) <= 10 and label == listops.value(tree)


def test_impossible_bounds_are_refused():
    with pytest.raises(ListOpsError, match="no tree has"):
        next(listops.generate(1, bounds=Bounds(max_depth=2, max_args=3, min_length=10, max_length=100)))
    with pytest.raises(ListOpsError, match="no tree has"):
        next(listops.generate(1, bounds=Bounds(min_length=100, max_length=101)))


def test_split_files(tmp_path):
    listops.write_splits(tmp_path, {"train": 50, "val": 10, "test": 10}, seed=0, bounds=SMALL)
    rows = {}
    for split, name in listops.SPLITS.items():
        lines = (tmp_path / name).read_text().splitlines()
        assert lines[0] == "Source\tTarget"
        rows[split] = list(listops.read_split(tmp_path / name))
    assert [len(rows[s]) for s in ("train", "val", "test")] == [50, 10, 10]
    assert rows["train"] + rows["val"] + rows["test"] == list(listops.generate(70, seed=0, bounds=SMALL))
    bad = tmp_path / "bad.tsv"
    bad.write_text("Source\tTarget\n[MAX 1 2 ]\n")
    with pytest.raises(ListOpsError, match="bad.tsv:2"):
        list(listops.read_split(bad))


def test_batches_pad_truncate_and_add_cls(tmp_path):
    (tmp_path / "basic_val.tsv").write_text("Source\tTarget\n( ( ( [MAX 2 ) 9 ) ] )\t9\n[MIN 1 2 3 4 5 6 ]\t1\n")
    split = load_split(tmp_path, "val")
    assert split.labels.tolist() == [9, 1] and split.lengths.tolist() == [4, 8]
    x, mask = split.batch(torch.tensor([0, 1]), seq_len=100, cls=False)
    assert x.shape == (2, 8) and mask.sum(1).tolist() == [4, 8] and (x[~mask] == listops.PAD).all()
    x, mask = split.batch(torch.tensor([1, 0]), seq_len=6, cls=True)
    assert x.shape == (2, 6) and (x[:, 0] == listops.CLS).all() and mask.sum(1).tolist() == [6, 5]
    assert [listops.VOCAB[i] for i in x[0]] == ["<cls>", "[MIN", "1", "2", "3", "4"]
    x, mask = split.batch(torch.tensor([0, 1, 0]), seq_len=100, cls=True, multiple=16)  # width rounded up
    assert x.shape == (3, 16) and mask.sum(1).tolist() == [5, 9, 5] and (x[~mask] == listops.PAD).all()
    assert [listops.VOCAB[i] for i in x[0, :5]] == ["<cls>", "[MAX", "2", "9", "]"]
    x, mask = split.batch(torch.tensor([1]), seq_len=7, cls=False, multiple=16)  # ... but never past seq_len
    assert x.shape == (1, 7) and mask.all()
    with pytest.raises(listops.DataError, match="lra listops prepare --out"):
        load_split(tmp_path, "train")


# --- the classifier -------------------------------------------------------------------------------


def classifier(attention: str, pool: str) -> SequenceClassifier:
    body = HTransformer1D(
        num_tokens=len(listops.VOCAB), dim=32, depth=2, max_seq_len=64, heads=2, dim_head=16, block_size=4,
        attention=attention, shift_tokens=True,
    )  # fmt: skip
    return SequenceClassifier(body, listops.NUM_CLASSES, pool).double().eval()


@pytest.mark.parametrize("attention", ["hierarchical", "dense"])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_padding_does_not_change_logits(attention, pool):
    model = classifier(attention, pool)
    gen = torch.Generator().manual_seed(0)
    lengths = [13, 7, 1 + (pool == "cls")]
    rows = [torch.randint(2, len(listops.VOCAB), (n,), generator=gen) for n in lengths]
    if pool == "cls":
        rows = [torch.cat([torch.tensor([listops.CLS]), r[1:]]) for r in rows]
    alone = torch.cat([model(r[None]) for r in rows])  # (3, 10), no padding at all
    for width in (13, 40):
        x = torch.randint(0, len(listops.VOCAB), (len(rows), width), generator=gen)  # junk where padded
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for b, r in enumerate(rows):
            x[b, : len(r)], mask[b, : len(r)] = r, True
        logits = model(x, mask)
        assert logits.shape == (3, listops.NUM_CLASSES)
        torch.testing.assert_close(logits, alone, rtol=1e-9, atol=1e-9)


def test_classifier_checks_its_arguments():
    body = HTransformer1D(num_tokens=17, dim=16, depth=1, max_seq_len=32, heads=2, dim_head=8, block_size=4)
    with pytest.raises(ValueError, match="pool"):
        SequenceClassifier(body, 10, pool="max")
    causal = HTransformer1D(num_tokens=17, dim=16, depth=1, max_seq_len=32, causal=True, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="non-causal"):
        SequenceClassifier(causal, 10)
    model = SequenceClassifier(body, 10)
    assert model(torch.randint(0, 17, (2, 9))).shape == (2, 10)
    assert model(torch.randint(0, 17, (2, 9)), torch.ones(2, 9, dtype=torch.bool)).shape == (2, 10)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_recipe_is_lras_configuration_with_the_studys_optimizer():
    cfg = ListOpsConfig()
    assert (cfg.depth, cfg.dim, cfg.heads, cfg.dim * cfg.ff_mult) == (4, 512, 8, 1024)
    assert cfg.pool == "cls"  # LRA's pooling_mode for ListOps; mean pooling did not learn on the GPU runs
    assert (cfg.batch_size, cfg.steps, cfg.seq_len, cfg.warmup_steps) == (32, 5000, 2000, 1000)
    # the study's best: LRA's schedule shape with a peak of 1.5e-4 and clipping at 1
    assert (cfg.lr, cfg.grad_clip) == (1.5e-4, 1.0)
    assert learning_rate(cfg, 1) == pytest.approx(1.5e-4 / 1000) and learning_rate(cfg, 1000) == pytest.approx(1.5e-4)
    assert learning_rate(cfg, 4000) == pytest.approx(1.5e-4 / 2)  # rsqrt decay
    lra = ListOpsConfig(lr=0.05 / 1000**0.5, grad_clip=0.0)  # LRA's own optimizer, as the *-lra-lr study runs
    assert learning_rate(lra, 1) == pytest.approx(0.05 / 1000**1.5)  # 0.05 * step/warmup * rsqrt(warmup)
    assert learning_rate(lra, 1000) == pytest.approx(0.05 / 1000**0.5)
    assert learning_rate(lra, 4000) == pytest.approx(0.05 / 4000**0.5)


# --- the command ----------------------------------------------------------------------------------


def test_prepare_train_evaluate(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["lra", "listops", "prepare", "--out", str(data), "--num-train", "48", "--num-val", "16",
                 "--num-test", "16", "--seed", "1", *SMALL_FLAGS]) == 0  # fmt: skip
    assert [len(list(listops.read_split(data / name))) for name in listops.SPLITS.values()] == [48, 16, 16]

    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY,
                 "--steps", "4", "--eval-every", "2"]) == 0  # fmt: skip
    for name in ("metrics.csv", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    for name in (*checkpoint.FILES, checkpoint.MANIFEST):
        assert (out / checkpoint.SAVES / "step-000004" / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and results["attention"] == "hierarchical" and results["steps"] == 4
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and [bool(r["val_acc"]) for r in rows] == [0, 1, 0, 1]
    capsys.readouterr()

    assert main(["lra", "listops", "evaluate", "--checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy: {results['test_accuracy']:.4f}" in printed
    model = h_transformer_1d.load(out)
    assert isinstance(model, SequenceClassifier) and not model.training and model.pool == "cls"
    assert model(torch.tensor([[listops.CLS, *listops.encode("[MAX 2 9 ]")]])).shape == (1, listops.NUM_CLASSES)
    assert main(["evaluate", "--checkpoint", str(out)]) == 1  # the language model's evaluate
    assert "is a listops checkpoint, not one of h-transformer-1d train" in capsys.readouterr().err

    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY, "--steps", "1"]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err

    dense = tmp_path / "dense"
    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(dense), *TINY, "--steps", "1",
                 "--attention", "dense", "--pool", "cls"]) == 0  # fmt: skip
    assert json.loads((dense / "results.json").read_text())["attention"] == "dense"


def test_clear_errors(tmp_path, capsys):
    assert main(["lra", "listops", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "h-transformer-1d lra listops prepare --out" in err and "Traceback" not in err
    assert main(["lra", "listops", "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *TINY,
                 "--block-size", "6"]) == 2  # fmt: skip
    assert "--block-size must be a power of two" in capsys.readouterr().err
    assert main(["lra", "listops", "evaluate", "--checkpoint", str(tmp_path)]) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["lra", "listops", "prepare", "--out", str(tmp_path), "--min-length", "5", "--max-length", "6"]) == 1
    assert "no tree has" in capsys.readouterr().err


def straight_and_interrupted(tmp_path, monkeypatch, action: str, flags: list[str], stop: int) -> None:
    """`lra listops ACTION` into tmp_path/straight, and into tmp_path/resumed interrupted (Ctrl-C) at step `stop`
    and resumed."""
    from h_transformer_1d.apps.lra import train as lra_train

    assert main(["lra", "listops", action, "--out", str(tmp_path / "straight"), *flags]) == 0
    real = lra_train.train_indices

    def interrupted(batches, step):
        if step == stop:
            raise KeyboardInterrupt
        return real(batches, step)

    monkeypatch.setattr(lra_train, "train_indices", interrupted)
    assert main(["lra", "listops", action, "--out", str(tmp_path / "resumed"), *flags]) == 130
    monkeypatch.setattr(lra_train, "train_indices", real)
    assert main(["lra", "listops", action, "--out", str(tmp_path / "resumed"), "--resume"]) == 0


def test_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    """A run interrupted after its step-4 checkpoint and resumed logs what an uninterrupted run logs."""
    data = tmp_path / "data"
    assert main(["lra", "listops", "prepare", "--out", str(data), "--num-train", "40", "--num-val", "8",
                 "--num-test", "8", "--seed", "2", *SMALL_FLAGS]) == 0  # fmt: skip
    # with the recipe's options: operands shuffled, batches bucketed by length, cosine decay, budget in epochs
    common = ["--data", str(data), *TINY, "--epochs", "1.4", "--eval-every", "2", "--dropout", "0.2",
              "--shuffle-operands", "--bucket", "2", "--schedule", "cosine"]  # fmt: skip
    straight_and_interrupted(tmp_path, monkeypatch, "train", common, stop=6)

    def rows(run):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            return [[r[k] for k in ("step", "examples", "lr", "train_loss", "train_acc", "val_acc")]
                    for r in csv.DictReader(f)]  # fmt: skip

    assert [r[0] for r in rows("resumed")] == [str(i) for i in range(1, 8)]
    assert rows("resumed") == rows("straight")

    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("straight", "resumed")]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    a, b = (h_transformer_1d.load(tmp_path / run) for run in ("straight", "resumed"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # --resume keeps the model: a flag that would change it is refused, naming it with both values
    resumed = tmp_path / "resumed"
    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    assert main(["lra", "listops", "train", "--out", str(resumed), "--resume", "--dim", "64", "--pool", "mean"]) == 2
    err = capsys.readouterr().err
    assert "dim=32 (asked: --dim 64)" in err and "pool='cls' (asked: --pool 'mean')" in err
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == before
    # ... and takes the training settings it is given: here two more steps
    assert main(["lra", "listops", "train", "--out", str(resumed), "--resume", "--steps", "9"]) == 0
    assert [r[0] for r in rows("resumed")] == [str(i) for i in range(1, 10)]
    assert checkpoint.load(resumed, LISTOPS).config.steps == 9


def test_resume_needs_a_resumable_checkpoint(tmp_path, capsys):
    assert main(["lra", "listops", "train", "--out", str(tmp_path / "none"), "--resume"]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err


def poison_after(model: torch.nn.Module, calls: int) -> torch.nn.Module:
    """Make the model's training forward passes return NaN from the `calls`-th one on."""
    seen = [0]

    def hook(module, args, output):
        if not torch.is_grad_enabled():
            return output
        seen[0] += 1
        return output * float("nan") if seen[0] >= calls else output

    model.register_forward_hook(hook)
    return model


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from h_transformer_1d.apps.lra import train as lra_train

    data = tmp_path / "data"
    assert main(["lra", "listops", "prepare", "--out", str(data), "--num-train", "40", "--num-val", "8",
                 "--num-test", "8", *SMALL_FLAGS]) == 0  # fmt: skip
    real = lra_train.build_classifier
    monkeypatch.setattr(lra_train, "build_classifier", lambda cfg: poison_after(real(cfg), calls=3))
    out = tmp_path / "run"
    assert main(["lra", "listops", "train", "--data", str(data), "--out", str(out), *TINY, "--steps", "6",
                 "--eval-every", "2"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "step 3: the training loss is nan (not finite)" in err and "checkpoint of step 2" in err
    assert "Traceback" not in err
    monkeypatch.setattr(lra_train, "build_classifier", real)
    saved = checkpoint.load(out, LISTOPS)
    assert saved.step == 2 and all(torch.isfinite(t).all() for t in saved.model.values())
    assert not (out / "results.json").exists()


def test_batches_of_empty_examples_keep_the_cls_token(tmp_path):
    (tmp_path / "basic_val.tsv").write_text("Source\tTarget\n[MIN 1 ]\t1\n")
    split = load_split(tmp_path, "val")
    empty = type(split)(split.tokens[:0], torch.tensor([0, 0]), torch.tensor([1]))  # one example, no tokens
    for multiple in (1, 128):
        x, mask = empty.batch(torch.tensor([0]), seq_len=200, cls=True, multiple=multiple)
        assert x[:, 0].tolist() == [listops.CLS] and mask.sum().item() == 1
        assert x.shape[1] == (1 if multiple == 1 else 128) and (x[:, 1:] == listops.PAD).all()
