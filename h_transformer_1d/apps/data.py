"""Byte corpora, their train/val/test splits, and the batches drawn from them.

Every token is a byte (vocabulary 256). A corpus of files is split by file (of the sorted files, every
20th from the 19th goes to validation, every 20th from the 20th to test: 90/5/5); a single file is
split by bytes (first 90%, next 5%, last 5%: for enwik8's 100M bytes exactly 90M/5M/5M).

With --pack the training split keeps its documents (files; a single file is one document): `train_pack`
fills each step with whole documents instead of random windows.

Inputs are bounded: only regular files are read (a FIFO, a device or a socket is refused, not waited on),
streamed and decompressed in chunks up to --max-data-bytes in all, and held once in memory, as uint8.
"""

import gzip
import sysconfig
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .core.config import MAX_DATA_BYTES
from .core.files import CHUNK, NotRegularError, open_regular


class DataError(ValueError):
    """The data cannot be read or is too small; the message names the path or flag."""


@dataclass
class Corpus:
    name: str
    train: torch.Tensor  # (N,) uint8
    val: torch.Tensor
    test: torch.Tensor
    train_docs: torch.Tensor | None = None  # (D,) int64: where each document of `train` starts (0 first)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def as_tensor(data: bytearray) -> torch.Tensor:
    """A uint8 tensor over `data`'s memory (no copy)."""
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


class Budget:
    """Reads streams into memory, at most `limit` bytes in all (--max-data-bytes): a larger input, or an
    archive that inflates beyond it (a zip bomb), stops at the limit with a DataError, never exhausting memory."""

    def __init__(self, path, limit: int):
        self.path, self.limit, self.left = path, limit, limit

    def read(self, stream: BinaryIO, into: bytearray) -> bytearray:
        while chunk := stream.read(min(CHUNK, self.left + 1)):
            into += chunk
            self.left -= len(chunk)
            if self.left < 0:
                raise DataError(
                    f"--data {self.path}: more than {self.limit:,} bytes (--max-data-bytes, counted after "
                    "decompression); raise --max-data-bytes to read it"
                )
        return into

    def read_file(self, path: Path, into: bytearray) -> bytearray:
        with open_regular(path) as f:
            return self.read(f, into)


def split_bytes(name: str, data: bytearray, file_sizes: list[int] | None = None) -> Corpus:
    """The first 90% of the bytes for training, the next 5% validation, the last 5% test. `file_sizes`: the
    files `data` joins, whose starts become the training documents (default: one document)."""
    n = len(data)
    a, b = n * 90 // 100, n * 95 // 100
    tokens = as_tensor(data)
    starts = torch.tensor([0] + (file_sizes or [])[:-1], dtype=torch.long).cumsum(0)
    return Corpus(name, tokens[:a], tokens[a:b], tokens[b:], starts[starts < a])


def split_files(name: str, files: list[Path], budget: Budget) -> Corpus:
    """Split a sorted file list 90/5/5 by file; fewer than 20 files are split by bytes instead."""
    if len(files) < 20:
        data, sizes = bytearray(), []
        for path in files:
            before = len(data)
            budget.read_file(path, data)
            sizes.append(len(data) - before)
        return split_bytes(name, data, sizes)
    parts = {"train": bytearray(), "val": bytearray(), "test": bytearray()}
    train_docs = []
    for i, path in enumerate(files):
        split = {18: "val", 19: "test"}.get(i % 20, "train")
        if split == "train":
            train_docs.append(len(parts["train"]))
        budget.read_file(path, parts[split])
    return Corpus(name, *(as_tensor(data) for data in parts.values()), torch.tensor(train_docs, dtype=torch.long))


def sorted_files(root: Path, pattern: str, skip: frozenset = frozenset()) -> list[Path]:
    """Regular files under `root` matching `pattern`, none in a hidden or `skip` folder, in path order."""
    files = [
        p
        for p in root.rglob(pattern)
        if p.is_file() and not any(part in skip or part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> tuple[Path, list[Path]]:
    """This interpreter's standard-library .py sources (no site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted_files(root, "*.py", frozenset({"site-packages", "dist-packages", "__pycache__"}))


def read_archive(path: Path, budget: Budget) -> bytearray:
    """The one file a .gz or .zip holds, inflated as it is read, within the budget."""
    with open_regular(path) as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=f, mode="rb") as inflated:
                return budget.read(inflated, bytearray())
        with zipfile.ZipFile(f) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                names = ", ".join(m.filename for m in members[:5])
                raise DataError(f"--data {path}: a .zip must hold exactly one file, it holds {len(members)} ({names})")
            with archive.open(members[0]) as inflated:
                return budget.read(inflated, bytearray())


def load_corpus(path: str | None, max_bytes: int = MAX_DATA_BYTES) -> Corpus:
    """The corpus of `--data PATH`, or the standard library's sources when `path` is None; at most `max_bytes`
    bytes are read (after decompression), and only from regular files."""
    budget = Budget(path, max_bytes)
    if path is None:
        root, files = stdlib_files()
        if not files:
            raise DataError(f"found no standard-library sources under {root}; pass --data PATH")
        # the folder's name, not its path: descriptions end up in committed benchmark reports
        corpus = split_files(f"Python standard library ({Path(root).name}, {len(files)} files)", files, budget)
    else:
        p = Path(path)
        try:
            if p.is_dir():
                files = sorted_files(p, "*")
                corpus = split_files(f"{p} ({len(files)} files)", files, budget)
            elif p.suffix in (".gz", ".zip"):
                corpus = split_bytes(str(p), read_archive(p, budget))
            else:
                corpus = split_bytes(str(p), budget.read_file(p, bytearray()))
        except FileNotFoundError:
            raise DataError(f"--data {path}: no such file or directory") from None
        except NotRegularError as e:
            raise DataError(f"--data {path}: {e}; pass a file, a .gz, a .zip or a directory") from None
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, gzip.BadGzipFile) as e:
            raise DataError(f"--data {path}: cannot read it ({e})") from None
    size = len(corpus.train) + len(corpus.val) + len(corpus.test)
    corpus.name += f", {size / 1e6:.1f} MB: {len(corpus.train):,} / {len(corpus.val):,} / {len(corpus.test):,} bytes"
    return corpus


def require_bytes(corpus: Corpus, split: str, seq_len: int) -> None:
    """A split must hold at least one window of seq_len + 1 bytes."""
    n = len(corpus.split(split))
    if n < seq_len + 1:
        raise DataError(
            f"the {split} split of {corpus.name} has {n} bytes; --seq-len {seq_len} needs at least {seq_len + 1}: "
            "use more data or a smaller --seq-len"
        )


def windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(len(starts), seq_len + 1) token windows, as uint8 (make them int64 on the device: 8x less to copy).

    Copied as contiguous slices, not gathered through int64 indices: on a GPU host the gather was a large
    share of the host time of a step (benchmarks/results/train_speed/), and an eager step of the base
    model keeps the host about as busy as the GPU."""
    return torch.stack([tokens[start : start + seq_len + 1] for start in starts.tolist()])


def train_batch(tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of optimizer step `step`: random windows that depend only on (seed, step).

    So the data position of a resumed run is its step, and every process can draw the same global batch
    and take its own rows.
    """
    generator = torch.Generator().manual_seed(seed * 2**32 + step)
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
    return windows(tokens, starts, seq_len)


def eval_starts(tokens: torch.Tensor, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Starts of non-overlapping windows (each predicts seq_len new bytes): all of them, or `count` spread evenly."""
    starts = torch.arange(0, len(tokens) - seq_len, seq_len)
    if count is not None and count < len(starts):
        starts = starts[torch.linspace(0, len(starts) - 1, count).round().long()]
    return starts


@dataclass
class Pieces:
    """The training documents cut for packing: piece i is tokens[starts[i] : starts[i] + lengths[i]]."""

    starts: torch.Tensor  # (P,) int64
    lengths: torch.Tensor  # (P,) int64, each 2 .. seq_len + 1
    cum_predictions: torch.Tensor  # (P,) int64: predictions (lengths - 1) of pieces 0..i


def document_pieces(corpus: Corpus, seq_len: int) -> Pieces:
    """Each training document cut into pieces of at most seq_len + 1 bytes, consecutive pieces sharing one
    byte (as a window of seq_len + 1 bytes predicts seq_len): every byte of a document after its first is
    predicted by exactly one piece. Documents of fewer than 2 bytes predict nothing and are left out."""
    doc_starts = corpus.train_docs if corpus.train_docs is not None else torch.zeros(1, dtype=torch.long)
    doc_ends = torch.cat([doc_starts[1:], torch.tensor([len(corpus.train)])])
    predictions = (doc_ends - doc_starts - 1).clamp(min=0)
    counts = -(-predictions // seq_len)  # pieces per document
    if not counts.sum():
        raise DataError(f"the train split of {corpus.name} has no document of 2 or more bytes to pack (--pack)")
    first = torch.repeat_interleave(doc_starts, counts)
    index = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    starts = first + index * seq_len
    lengths = torch.minimum(torch.repeat_interleave(doc_ends, counts) - starts, torch.tensor(seq_len + 1))
    return Pieces(starts, lengths, (lengths - 1).cumsum(0))


@dataclass
class PackedBatch:
    """A step's packed rows: row r is pieces row_bounds[r]:row_bounds[r + 1] back to back in `tokens`,
    together exactly seq_len predictions."""

    tokens: torch.Tensor  # (total,) uint8
    lengths: list[int]  # tokens of each piece
    row_bounds: list[int]  # (rows + 1) piece indices

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows lo..hi-1 as (tokens (T,) uint8, cu_seqlens (pieces + 1,) int32 on the CPU, the longest piece)."""
        first, last = self.row_bounds[lo], self.row_bounds[hi]
        lengths = torch.tensor(self.lengths[first:last], dtype=torch.int32)
        offset = sum(self.lengths[:first])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
        return self.tokens[offset : offset + int(cu[-1])], cu, int(lengths.max())


def train_pack(tokens: torch.Tensor, pieces: Pieces, seq_len: int, batch_size: int, seed: int, step: int) -> PackedBatch:
    """The global batch of optimizer step `step` with --pack: `batch_size` rows, each whole pieces of documents
    (drawn at random, a piece as often as its share of the predicted bytes, the same share a random window
    gives them) up to exactly seq_len predictions, the last piece of a row cut to fit. Depends only on
    (seed, step), as `train_batch`: a resumed run continues exactly, and the rows split over micro-batches
    and processes as the windows do, each row holding the same number of predictions."""
    generator = torch.Generator().manual_seed(seed * 2**32 + step)
    total = int(pieces.cum_predictions[-1])
    chosen_starts, lengths, row_bounds = [], [], [0]
    draws: list[int] = []
    for _ in range(batch_size):
        left = seq_len
        while left:
            if not draws:  # random bytes among all predicted ones, drawn a few at a time
                picks = torch.randint(total, (64,), generator=generator)
                draws = torch.searchsorted(pieces.cum_predictions, picks, right=True).tolist()[::-1]
            i = draws.pop()
            n = min(int(pieces.lengths[i]), left + 1)
            chosen_starts.append(int(pieces.starts[i]))
            lengths.append(n)
            left -= n - 1
        row_bounds.append(len(lengths))
    batch = torch.cat([tokens[start : start + n] for start, n in zip(chosen_starts, lengths)])
    return PackedBatch(batch, lengths, row_bounds)
