"""`train --pack`: steps of whole documents packed into a fixed budget of predicted bytes."""

import csv
import math
import random
from pathlib import Path

import pytest
import torch

from h_transformer_1d.apps import data
from h_transformer_1d.apps.cli import main
from h_transformer_1d.apps.config import LM, Config, build_model
from h_transformer_1d.apps.core import checkpoint
from h_transformer_1d.apps.core.config import ConfigError

SEQ = 32
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--seq-len", str(SEQ), "--block-size", "8",
        "--batch-size", "4", "--eval-batches", "2", "--sample-every", "0", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """25 files (split by file: 23 train) of 0 bytes, 1 byte, shorter than --seq-len and several times longer."""
    root = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    sizes = [0, 1, 2, SEQ, SEQ + 1, SEQ + 2, 5 * SEQ + 3] + [rng.randint(3, 6 * SEQ) for _ in range(18)]
    for i, size in enumerate(sizes):
        text = "".join(rng.choice("abcdefgh \n") for _ in range(size))
        (root / f"doc{i:02d}.txt").write_text(text)
    return root


def documents(corpus_obj) -> list[tuple[int, int]]:
    starts = corpus_obj.train_docs.tolist()
    return list(zip(starts, starts[1:] + [len(corpus_obj.train)]))


def test_training_documents_are_the_files(corpus):
    c = data.load_corpus(str(corpus))
    files = sorted(corpus.iterdir())
    train_files = [f for i, f in enumerate(files) if i % 20 not in (18, 19)]
    assert [b - a for a, b in documents(c)] == [f.stat().st_size for f in train_files]
    one = data.load_corpus(str(files[6]))  # a single file: one document
    assert one.train_docs.tolist() == [0]


def test_pieces_cover_every_predicted_byte_once(corpus):
    c = data.load_corpus(str(corpus))
    pieces = data.document_pieces(c, SEQ)
    predicted = torch.zeros(len(c.train), dtype=torch.int)
    for start, n in zip(pieces.starts.tolist(), pieces.lengths.tolist()):
        assert 2 <= n <= SEQ + 1
        assert any(a <= start and start + n <= b for a, b in documents(c)), "a piece crosses a document boundary"
        predicted[start + 1 : start + n] += 1
    firsts = [a for a, b in documents(c) if b > a]
    expected = torch.ones(len(c.train), dtype=torch.int)
    expected[firsts] = 0
    assert torch.equal(predicted, expected)


def test_packed_batches_fill_the_budget_and_depend_on_seed_and_step_only(corpus):
    c = data.load_corpus(str(corpus))
    pieces = data.document_pieces(c, SEQ)
    batch = data.train_pack(c.train, pieces, SEQ, 4, seed=1, step=3)
    again = data.train_pack(c.train, pieces, SEQ, 4, seed=1, step=3)
    assert torch.equal(batch.tokens, again.tokens) and batch.lengths == again.lengths
    assert not torch.equal(data.train_pack(c.train, pieces, SEQ, 4, seed=1, step=4).tokens, batch.tokens)
    for row in range(4):
        _, cu, longest = batch.rows(row, row + 1)
        assert int((cu[1:] - cu[:-1] - 1).sum()) == SEQ  # exactly seq_len predictions per row
        assert longest <= SEQ + 1
    tokens, cu, _ = batch.rows(0, 4)
    assert len(tokens) == int(cu[-1]) == len(batch.tokens)
    # every piece is a prefix of a piece of a document: its bytes are the document's
    starts = set(pieces.starts.tolist())
    offset = 0
    for n in batch.lengths:
        segment = batch.tokens[offset : offset + n]
        assert any(torch.equal(c.train[s : s + n], segment) for s in starts)
        offset += n


def test_the_loss_never_crosses_a_document_boundary(corpus):
    """The packed loss of a micro-batch equals the mean of each piece's own loss, weighted by its
    predictions: no byte is predicted from another document."""
    c = data.load_corpus(str(corpus))
    torch.manual_seed(0)
    cfg = Config(dim=32, depth=1, heads=2, dim_head=16, seq_len=SEQ, block_size=8, batch_size=4, pack=True)
    model = build_model(cfg).double()
    batch = data.train_pack(c.train, data.document_pieces(c, SEQ), SEQ, 4, seed=0, step=1)
    x, cu, longest = batch.rows(1, 3)
    packed = model(x.long(), cu_seqlens=cu, max_seqlen=longest)
    total, count = 0.0, 0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        total += model(x[None, a:b].long()).item() * (b - a - 1)
        count += b - a - 1
    assert count == 2 * SEQ
    assert math.isclose(packed.item(), total / count, rel_tol=1e-12)


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_pack_trains_and_resumes_exactly(corpus, tmp_path, monkeypatch, capsys):
    common = ["--data", str(corpus), *TINY, "--pack", "--steps", "6", "--eval-every", "3", "--grad-accum", "2",
              "--dropout", "0.1"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "straight"), *common]) == 0
    assert "documents packed" in capsys.readouterr().out
    straight = rows(tmp_path / "straight")
    assert all(math.isfinite(float(r["train_bpb"])) for r in straight) and len(straight) == 6

    real = data.train_pack

    def interrupted(tokens, pieces, seq_len, batch_size, seed, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(tokens, pieces, seq_len, batch_size, seed, step)

    monkeypatch.setattr(data, "train_pack", interrupted)
    assert main(["train", "--out", str(tmp_path / "resumed"), *common]) == 130
    monkeypatch.setattr(data, "train_pack", real)
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    keys = ("step", "tokens", "lr", "train_bpb", "val_bpb")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "resumed")] == [[r[k] for k in keys] for r in straight]
    a = checkpoint.load(tmp_path / "straight", LM)
    b = checkpoint.load(tmp_path / "resumed", LM)
    assert a.config.pack and all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_packed_steps_differ_from_window_steps(corpus, tmp_path):
    args = ["--data", str(corpus), *TINY, "--steps", "2", "--eval-every", "2"]
    assert main(["train", "--out", str(tmp_path / "windows"), *args]) == 0
    assert main(["train", "--out", str(tmp_path / "packed"), *args, "--pack"]) == 0
    assert rows(tmp_path / "windows")[0]["train_bpb"] != rows(tmp_path / "packed")[0]["train_bpb"]
    assert rows(tmp_path / "windows")[0]["tokens"] == rows(tmp_path / "packed")[0]["tokens"]


def test_pack_refuses_compile():
    from h_transformer_1d.apps.config import validate

    with pytest.raises(ConfigError, match="--pack cannot be combined with --compile"):
        validate(Config(pack=True, compile=True))
