"""The ListOps data as tensors: the splits, their batches, the order of the training batches (bucketed by
length) and the operand shuffling that augments them."""

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..core.config import MAX_DATA_BYTES
from ..core.files import open_regular
from ..data import DataError
from . import listops

FIRST_OPERATOR, LAST_OPERATOR = listops.VOCAB.index(listops.OPERATORS[0]), listops.VOCAB.index(listops.OPERATORS[-1])
END = listops.VOCAB.index(listops.END)


@dataclass
class Split:
    """The examples of one split as tensors: token ids end to end, where each starts, the labels."""

    tokens: torch.Tensor  # (T,) uint8, every example's ids, concatenated
    starts: torch.Tensor  # (n + 1,) int64, example i is tokens[starts[i]:starts[i + 1]]
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> torch.Tensor:
        return self.starts[1:] - self.starts[:-1]

    def to(self, device) -> "Split":
        return Split(self.tokens.to(device), self.starts.to(device), self.labels.to(device))

    def batch(
        self,
        indices: torch.Tensor,
        seq_len: int,
        cls: bool,
        multiple: int = 1,
        shuffle: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids x (B, L) on the split's device and their mask (B, L): each example truncated to
        seq_len (<cls> included, first, if asked) and padded; L is the longest rounded up to a
        multiple of `multiple`, at most seq_len. With a `shuffle` generator the operands of every operator
        are shuffled first (before any truncation, so whole trees are shuffled). A few gathers, no loop over
        the examples."""
        indices = indices.to(self.starts.device)
        begin = self.starts[indices]
        full = self.starts[indices + 1] - begin
        lengths = torch.clamp(full, max=seq_len - cls)
        longest = int(lengths.max()) + cls
        width = min(-(-longest // multiple) * multiple, seq_len) - cls
        gathered = max(width, int(full.max())) if shuffle is not None else width
        pos = torch.arange(gathered, device=begin.device)
        tokens = self.tokens if len(self.tokens) else self.tokens.new_zeros(1)  # something to gather from
        ids = tokens[(begin[:, None] + pos).clamp(max=len(tokens) - 1)].long()
        if shuffle is not None:
            real = pos < full[:, None]
            ids = shuffle_operands(torch.where(real, ids, listops.PAD), real, shuffle)
        mask = pos[:width] < lengths[:, None]
        x = torch.where(mask, ids[:, :width], listops.PAD)
        if cls:
            x = torch.cat((x.new_full((len(x), 1), listops.CLS), x), 1)
            mask = torch.cat((mask.new_ones((len(mask), 1)), mask), 1)
        return x, mask


def load_split(data_dir: Path, split: str, max_bytes: int = MAX_DATA_BYTES) -> Split:
    """The examples of a split's TSV file, a regular file of at most `max_bytes` bytes."""
    path = data_dir / listops.SPLITS[split]
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(
            f"--data {data_dir}: no {path.name}. Create the ListOps files with: "
            f"h-transformer-1d lra listops prepare --out {data_dir}"
        ) from None
    except OSError as e:
        raise DataError(f"--data {data_dir}: cannot read {path.name} ({e})") from None
    if size > max_bytes:
        raise DataError(
            f"--data {data_dir}: {path.name} holds {size:,} bytes, more than --max-data-bytes {max_bytes:,}"
        )
    ids, starts, labels = bytearray(), [0], []
    for text, label in listops.read_split(path):
        ids += bytes(listops.encode(text))
        starts.append(len(ids))
        labels.append(label)
    if not labels:
        raise DataError(f"{path} holds no examples")
    tokens = torch.frombuffer(ids, dtype=torch.uint8) if ids else torch.empty(0, dtype=torch.uint8)
    return Split(tokens, torch.tensor(starts), torch.tensor(labels))


# --- operand shuffling ----------------------------------------------------------------------------


def shuffle_operands(ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each expression of `ids` (B, W; real tokens where `mask`, first) with the operands of every operator in
    a random order: MIN, MAX, MED and SM do not depend on the order of their arguments, so the label stays.

    Every operand (a digit, or a subtree "[OP ... ]") is a unit with a random key; a token's sort key is the
    path of keys of the units holding it, from the root down, with an operator first (-1) and its "]" last (2)
    among its node's operands. Sorting by that path, one stable sort per level from the deepest up, keeps each
    subtree contiguous and shuffles siblings. Padding sorts after the expression."""
    is_operator = (ids >= FIRST_OPERATOR) & (ids <= LAST_OPERATOR) & mask
    is_end = (ids == END) & mask
    change = is_operator.long() - is_end.long()
    depth = change.cumsum(1) - change  # operators open before each token
    level = torch.where(is_end, depth - 1, depth)  # the level of the unit a token opens or closes
    starts = mask & ~is_end  # an operator or a digit opens a unit
    keys = torch.rand(ids.shape, generator=generator, device=ids.device)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    order = pos
    for lvl in range(int(level.masked_fill(~mask, 0).max()) + 1, -1, -1):
        last = torch.where(starts & (level == lvl), pos, -1).cummax(1).values  # the unit of this level holding t
        key = keys.gather(1, last.clamp(min=0))
        inner = torch.where(is_end & (level == lvl - 1), 2.0, -1.0)  # a "]" after its operands, the rest first
        key = torch.where(level >= lvl, key, inner)
        if lvl == 0:
            key = key.masked_fill(~mask, 3.0)
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    return ids.gather(1, order)


# --- the order of the training batches ------------------------------------------------------------


@lru_cache(maxsize=1)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


@dataclass
class Batches:
    """The examples of every training step: epochs of a seeded permutation (the last partial batch dropped),
    with `window` > 1 cut into windows of `window` batches whose examples are sorted by length and batched
    with their neighbours, the batches then taken in a seeded random order. So a batch pads little, and an
    epoch costs what its tokens cost; `window` 1 gives random batches."""

    lengths: torch.Tensor  # (n,) the examples' lengths, on the CPU
    batch_size: int
    seed: int
    window: int = 1
    cached: tuple = field(default=(None, None), repr=False)

    @property
    def per_epoch(self) -> int:
        return len(self.lengths) // self.batch_size

    def epoch(self, epoch: int) -> torch.Tensor:
        """The batches of an epoch, (per_epoch, batch_size) example indices."""
        count, size = self.per_epoch, self.batch_size
        perm = epoch_order(len(self.lengths), self.seed, epoch)[: count * size]
        if self.window <= 1:
            return perm.view(count, size)
        sorted_windows = [w[self.lengths[w].argsort(stable=True)] for w in perm.split(self.window * size)]
        batches = torch.cat(sorted_windows).view(count, size)
        shuffle = torch.Generator().manual_seed(seed_of("batches", self.seed, epoch))
        return batches[torch.randperm(count, generator=shuffle)]

    def indices(self, step: int) -> torch.Tensor:
        """The examples of a step (steps count from 1)."""
        epoch, i = divmod(step - 1, self.per_epoch)
        if self.cached[0] != epoch:
            self.cached = (epoch, self.epoch(epoch))
        return self.cached[1][i]


def seed_of(purpose: str, seed: int, number: int) -> int:
    """A seed for one purpose (batch order, operand shuffling, masking) and one epoch or step, apart from the
    other purposes' and numbers' (63 bits of a hash)."""
    digest = hashlib.blake2b(f"listops/{purpose}/{seed}/{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
