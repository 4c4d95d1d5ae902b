"""Packed variable-length batches: `h_attention_varlen` on q, k, v (total_tokens, heads, dim_head) holding
several sequences back to back, in FlashAttention's convention (cu_seqlens, max_seqlen).

How: a sequence of length n padded to L with the key padding mask False on the padding gives exactly the
result of the length-n sequence alone (padding is never a key, levels are aligned to position 0, rotary
positions start at 0: docs/design.md 1.5). So the sequences are grouped into a few buckets of similar
length, each bucket is gathered into a padded (b, H, L, D) batch with one index gather, `h_attention` runs
on it with the mask, and one index op puts the outputs back in packed order. Gradients go back through the
same gather and scatter. The grouping needs the lengths on the host (see `VarlenLayout`).
"""

from itertools import pairwise

import torch

from .interface import check_block_size, check_qkv, h_attention

# A bucket closes when one more sequence would make more than this share of its slots padding beyond the
# whole blocks each sequence needs anyway; at most MAX_BUCKETS buckets (the last one takes the rest).
MAX_PADDING = 0.125
MAX_BUCKETS = 8


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_lengths(lengths: list[int], block_size: int, max_padding: float = MAX_PADDING,
                   max_buckets: int = MAX_BUCKETS) -> list[tuple[int, list[int]]]:  # fmt: skip
    """Groups of the non-empty sequences: [(padded length L, sequence indices longest first), ...].

    A bucket's L is its longest sequence rounded up to whole blocks. A sequence joins the open bucket while
    the bucket's padding beyond each member's own whole blocks stays within `max_padding` of its slots."""
    order = sorted((i for i, n in enumerate(lengths) if n), key=lambda i: -lengths[i])
    buckets: list[tuple[int, list[int]]] = []
    extra = 0  # the open bucket's padding beyond its members' own whole blocks
    for i in order:
        own = _round_up(lengths[i], block_size)
        if buckets:
            padded, members = buckets[-1]
            grown = extra + padded - own
            if len(buckets) == max_buckets or grown <= max_padding * padded * (len(members) + 1):
                members.append(i)
                extra = grown
                continue
        buckets.append((own, [i]))
        extra = 0
    return buckets


class VarlenLayout:
    """Where each token of a packed stream goes in the padded bucket batches, and back.

    Built on the host from the sequence lengths, its index tensors copied to `device` in one transfer.
    One layout serves every layer of a model's forward; nothing is cached beyond the object.
    """

    def __init__(self, lengths: list[int], block_size: int, device: torch.device | str = "cpu"):
        self.lengths = list(lengths)
        self.total = sum(self.lengths)
        self.buckets = bucket_lengths(self.lengths, block_size)
        lengths_t = torch.tensor(self.lengths, dtype=torch.long)
        ends = lengths_t.cumsum(0)
        starts = ends - lengths_t
        gathers, masks, slot_start = [], [], torch.zeros(len(self.lengths), dtype=torch.long)
        offset = 0
        self.shapes = []  # (b, L) per bucket
        for padded, members in self.buckets:
            rows = torch.tensor(members, dtype=torch.long)
            cols = torch.arange(padded)
            mask = cols < lengths_t[rows, None]  # (b, L)
            # padding slots read token 0, any real row: the mask keeps their contents out of every result
            gathers.append(torch.where(mask, starts[rows, None] + cols, 0).flatten())
            masks.append(mask.flatten())
            slot_start[rows] = offset + torch.arange(len(members)) * padded
            offset += len(members) * padded
            self.shapes.append((len(members), padded))
        self.full = [bool(m.all()) for m in masks]  # no padding in the bucket: no mask to pass
        # the slot of each token in the buckets' concatenated outputs
        scatter = torch.arange(self.total) + torch.repeat_interleave(slot_start - starts, lengths_t)
        # the first and the last token of each sequence (token shift stops at them)
        edges = torch.zeros(2, self.total, dtype=torch.long)
        edges[0, starts[lengths_t > 0]] = 1
        edges[1, ends[lengths_t > 0] - 1] = 1
        host = torch.cat(gathers + [scatter] + [m.long() for m in masks] + [edges.flatten()])
        sizes = [b * n for b, n in self.shapes]
        parts = host.to(device, non_blocking=True).split(sizes + [self.total] + sizes + [self.total] * 2)
        self.gather, self.scatter = parts[: len(sizes)], parts[len(sizes)]
        self.masks = [m.bool().view(shape) for m, shape in zip(parts[len(sizes) + 1 : -2], self.shapes)]
        self.first, self.last = parts[-2].bool(), parts[-1].bool()

    def pad(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (total, ...) -> per bucket (b, L, ...), sequences in rows, padding after each."""
        return [x.index_select(0, index).unflatten(0, shape) for index, shape in zip(self.gather, self.shapes)]

    def unpad(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Per bucket outputs (b, L, ...) -> (total, ...) in packed order."""
        flat = torch.cat([o.flatten(0, 1) for o in outs]) if len(outs) > 1 else outs[0].flatten(0, 1)
        return flat.index_select(0, self.scatter)

    def apply(self, attend, *tensors: torch.Tensor) -> torch.Tensor:
        """attend(*padded, key_padding_mask) on each bucket's (b, L, ...) batches of `tensors`
        (total, ...) -> its (b, L, ...) outputs put back as (total, ...)."""
        outs = []
        for i, padded in enumerate(zip(*(self.pad(t) for t in tensors))):
            outs.append(attend(*padded, None if self.full[i] else self.masks[i]))
        return self.unpad(outs)

    def boundaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(total,) bool on the layout's device: the first and the last token of each sequence."""
        return self.first, self.last


def check_cu_seqlens(cu_seqlens, max_seqlen, total: int) -> list[int]:
    """The sequence lengths of `cu_seqlens`, after checking it and `max_seqlen`; one copy to the host
    when cu_seqlens is on a GPU."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of dtype torch.int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_tokens = {total}, got {bounds[-1]}")
    lengths = [b - a for a, b in pairwise(bounds)]
    if min(lengths) < 0:
        i = min(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds[i]} then {bounds[i + 1]} at {i}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__} {max_seqlen!r}")
    if max_seqlen < max(lengths):
        raise ValueError(f"max_seqlen must be at least the longest sequence, {max(lengths)}, got {max_seqlen}")
    return lengths


def varlen_layout(cu_seqlens, max_seqlen, block_size: int, total: int, device) -> VarlenLayout:
    """The checked `VarlenLayout` of `cu_seqlens` for a packed stream of `total` tokens on `device`."""
    check_block_size(block_size)
    return VarlenLayout(check_cu_seqlens(cu_seqlens, max_seqlen, total), block_size, device)


def check_packed_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total_tokens, heads, dim_head), got rank {t.dim()}")
    if q.shape[0] != k.shape[0] or k.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k and v must agree in total_tokens and k and v in heads, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0]:  # dtypes, devices, head dims, kv heads dividing q's: as h_attention checks them
        check_qkv(*(t[None].transpose(1, 2) for t in (q, k, v)))


def varlen_attention(q, k, v, layout: VarlenLayout, **kwargs) -> torch.Tensor:
    """`h_attention(**kwargs)` on each sequence of the packed q, k (total, H, D), v (total, H, Dv) of
    `layout` -> (total, H, Dv). The checks are the caller's."""
    if not layout.total:
        return v * 0  # no tokens: an empty result, still connected to v for autograd

    def attend(qb, kb, vb, mask):  # each (b, L, H, D)
        qb, kb, vb = (t.transpose(1, 2) for t in (qb, kb, vb))
        return h_attention(qb, kb, vb, key_padding_mask=mask, **kwargs).transpose(1, 2)

    return layout.apply(attend, q, k, v)


def h_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    block_size: int,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rotary_freqs: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Hierarchical attention on sequences packed back to back: q (total_tokens, H, D), k (total_tokens, Hkv,
    D), v (total_tokens, Hkv, Dv) -> (total_tokens, H, Dv); Hkv < H is grouped-query attention as in
    `h_attention`.

    Args:
        cu_seqlens: (num_seqs + 1,) int32, the cumulative sequence starts: 0, then each sequence's end,
            the last total_tokens (FlashAttention's convention; empty sequences allowed). The lengths are
            read on the host: a CPU tensor costs nothing, a GPU one one copy to the host (a sync), so keep
            it on the CPU where you can.
        max_seqlen: an int at least the longest sequence's length.
        block_size, causal, scale, dropout_p, rotary_freqs, impl: as for `h_attention`, per sequence.

    Each sequence has its own hierarchy (levels aligned to its own start; rotary positions from 0 at its
    start) and nothing crosses a sequence boundary: the result equals `h_attention` on each sequence alone.
    The sequences run as a few padded batches of similar length (module docstring).
    """
    check_packed_qkv(q, k, v)
    layout = varlen_layout(cu_seqlens, max_seqlen, block_size, q.shape[0], q.device)
    return varlen_attention(
        q, k, v, layout, block_size=block_size, causal=causal, scale=scale, dropout_p=dropout_p,
        rotary_freqs=rotary_freqs, impl=impl,
    )
