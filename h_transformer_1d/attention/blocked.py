"""Hierarchical attention in blocked PyTorch: O(N * block_size) work, O(N) memory, any device.

Each level is computed at its own resolution as a batch of small windows (no Python loop over
blocks), yielding per query a running max ``m``, a sum of weights ``l`` and a weighted sum of values
``o``. Levels are merged coarse to fine with log-sum-exp arithmetic, so the whole row shares one
softmax (DESIGN.md section 3) and the merge buffers shrink geometrically with the level.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .reference import num_levels


class Partial(NamedTuple):
    """Unnormalised softmax state per query: max score, sum of weights, weighted sum of values."""

    m: torch.Tensor  # (B, H, M)
    l: torch.Tensor  # (B, H, M)
    o: torch.Tensor  # (B, H, M, D)


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad or truncate dim 2 (the sequence) of a (B, H|1, N, ...) tensor to `length`."""
    n = x.shape[2]
    if n >= length:
        return x[:, :, :length]
    pad = [0, 0] * (x.dim() - 3) + [0, length - n]
    return F.pad(x, pad)


def _shift_blocks(xb: torch.Tensor, offset: int) -> torch.Tensor:
    """result[..., c, :, ...] = xb[..., c + offset, :, ...] along the block dim 2, zero outside."""
    if offset < 0:
        return F.pad(xb, [0, 0] * (xb.dim() - 3) + [-offset, 0])[:, :, : xb.shape[2]]
    return F.pad(xb, [0, 0] * (xb.dim() - 3) + [0, offset])[:, :, offset:]


def _window_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float
) -> Partial:
    """Softmax state of block queries q (B,H,nb,R,D) over window keys k, v (B,H,nb,K,D).

    `bias` broadcasts to (B,H,nb,R,K): 0 or log(count) for a key, -inf where it is not attended.
    """
    # in place after the matmul: one score-sized buffer instead of three (these dominate memory)
    scores = (q @ k.transpose(-1, -2)).add_(bias)
    with torch.no_grad():
        m = scores.amax(-1, keepdim=True)
        m = m.masked_fill_(m == float("-inf"), 0.0)  # rows with no key: all weights become 0
    p = scores.sub_(m).exp_()
    l = p.sum(-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    o = p @ v
    b, h, nb, r, d = o.shape
    return Partial(m.reshape(b, h, nb * r), l.reshape(b, h, nb * r), o.reshape(b, h, nb * r, d))


def _merge(a: Partial, b: Partial) -> Partial:
    m = torch.maximum(a.m, b.m)
    wa, wb = torch.exp(a.m - m), torch.exp(b.m - m)
    return Partial(m, a.l * wa + b.l * wb, a.o * wa[..., None] + b.o * wb[..., None])


def _upsample(p: Partial, length: int) -> Partial:
    """A level's state, repeated for both children of each group, cut to the finer level's length."""
    return Partial(
        p.m.repeat_interleave(2, dim=2)[:, :, :length],
        p.l.repeat_interleave(2, dim=2)[:, :, :length],
        p.o.repeat_interleave(2, dim=2)[:, :, :length],
    )


def _key_bias(log_count: torch.Tensor, nr: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """(B,1,nb,1,len(offsets)*nr): per-key bias of the window made of blocks c+offset."""
    b, m = log_count.shape
    blocks = log_count.reshape(b, 1, m // nr, nr)
    parts = [_shift_blocks(blocks, o) if o else blocks for o in offsets]
    # out-of-range blocks were zero-filled: they must not be keys
    nb = m // nr
    idx = torch.arange(nb, device=log_count.device)
    parts = [
        part.masked_fill(((idx + o < 0) | (idx + o >= nb))[None, None, :, None], float("-inf"))
        for part, o in zip(parts, offsets)
    ]
    return torch.cat(parts, dim=-1)[:, :, :, None, :]


def _window(x: torch.Tensor, nr: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """(B,H,M,D) -> (B,H,nb,len(offsets)*nr,D): for each block c, the blocks c+offset side by side."""
    b, h, m, d = x.shape
    xb = x.reshape(b, h, m // nr, nr, d)
    return torch.cat([_shift_blocks(xb, o) if o else xb for o in offsets], dim=3)


def _level_mask(nr: int, causal: bool, level: int, device) -> torch.Tensor:
    """(R, K) bool: which window keys a query row of a block may see at this level.

    Level 0 windows are blocks (c-1, c, c+1), or (c-1, c) causal with a triangular diagonal block.
    Level >= 1 windows are blocks (c-1, c+1), or (c-1) causal, minus the half-blocks that the level
    below already covered: first-half rows skip the second half of c-1, second-half rows skip the
    first half of c+1.
    """
    row = torch.arange(nr, device=device)[:, None]
    col = torch.arange(nr, device=device)[None, :]
    full = torch.ones(nr, nr, dtype=torch.bool, device=device)
    if level == 0:
        if causal:
            return torch.cat([full, col <= row], dim=1)
        return torch.cat([full, full, full], dim=1)
    half = nr // 2
    prev = ~((row < half) & (col >= half))
    if causal:
        return prev
    nxt = ~((row >= half) & (col < half))
    return torch.cat([prev, nxt], dim=1)


def _masked_log(count: torch.Tensor) -> torch.Tensor:
    return torch.log(count)  # log(0) = -inf: an empty group is no key


def _attend(q, k, v, count, nr, causal, level, dropout_p) -> Partial:
    """One level: queries q and keys k, v (B,H,M,D) at that level's resolution, counts (B,M)."""
    offsets = ((-1, 0, 1) if not causal else (-1, 0)) if level == 0 else ((-1, 1) if not causal else (-1,))
    b, h, m, d = q.shape
    bias = _key_bias(_masked_log(count), nr, offsets)
    allowed = _level_mask(nr, causal, level, q.device)
    bias = bias.masked_fill(~allowed, float("-inf"))
    return _window_partial(
        q.reshape(b, h, m // nr, nr, d), _window(k, nr, offsets), _window(v, nr, offsets), bias, dropout_p
    )


def _pair_sum(x: torch.Tensor, length: int) -> torch.Tensor:
    """Sum of aligned pairs along dim 2, the input zero-padded to 2 * `length` first.

    Half-precision inputs are summed into float32 without a float32 copy of the input.
    """
    x = _pad_seq(x, 2 * length)
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    return x.reshape(*x.shape[:2], length, 2, *x.shape[3:]).sum(3, dtype=dtype)


def _pair_first(x: torch.Tensor, count: torch.Tensor, length: int) -> torch.Tensor:
    """For each aligned pair along dim 2, the left member if its group has a valid position, else the right."""
    x = _pad_seq(x, 2 * length)
    x = x.reshape(*x.shape[:2], length, 2, *x.shape[3:])
    c = _pad_seq(count[:, None], 2 * length).reshape(count.shape[0], 1, length, 2)
    return torch.where((c[:, :, :, 0] > 0)[..., None], x[:, :, :, 0], x[:, :, :, 1])


def coarse_levels(q0, k0, v0, count, lengths: list[int], causal: bool):
    """Yield, for levels 1.., the coarse (query, mean key, mean value, count), each (B,H,lengths[l],D).

    q0, k0, v0 (B,H,lengths[0],D) hold the fine level with padded content zeroed; count (B,
    lengths[0]) is 1 for a real token. Coarse queries are means over valid positions, or for the
    causal variant the first valid position's query; sums of half-precision inputs are float32.
    """
    q_acc, k_acc, v_acc, c_acc = q0, k0, v0, count
    for length in lengths[1:]:
        q_acc = _pair_first(q_acc, c_acc, length) if causal else _pair_sum(q_acc, length)
        k_acc, v_acc = _pair_sum(k_acc, length), _pair_sum(v_acc, length)
        c_acc = _pair_sum(c_acc[:, None], length)[:, 0]
        denom = c_acc.clamp(min=1.0)[:, None, :, None]
        yield (q_acc if causal else q_acc / denom), k_acc / denom, v_acc / denom, c_acc


def blocked_h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Hierarchical attention on (B, H, N, D) tensors (inputs assumed validated); returns (B, H, N, D)."""
    b, h, n, d = q.shape
    nr = block_size
    out_dtype = q.dtype
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if key_padding_mask is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    else:
        valid = key_padding_mask.to(device=q.device, dtype=torch.bool)

    top = num_levels(n, nr)
    lengths = [-(-n // (nr << lv)) * nr for lv in range(top + 1)]  # padded tokens per level

    count = _pad_seq(valid[:, None].to(compute_dtype), lengths[0])[:, 0]  # (B, M0)
    keep = count[:, None, :, None]
    q0, k0, v0 = (_pad_seq(t, lengths[0]) * keep for t in (q * scale, k, v))
    fine = _attend(q0, k0, v0, count, nr, causal, 0, dropout_p)
    coarse = [
        _attend(q_l, k_l, v_l, c_l, nr, causal, level, dropout_p)
        for level, (q_l, k_l, v_l, c_l) in enumerate(coarse_levels(q0, k0, v0, count, lengths, causal), start=1)
    ]

    # merge coarse to fine: every level's state is shared by the whole group below it
    state = None
    for level in range(top, 0, -1):
        part = coarse[level - 1]
        state = part if state is None else _merge(_upsample(state, lengths[level]), part)
    state = fine if state is None else _merge(_upsample(state, lengths[0]), fine)

    out = state.o / state.l.clamp(min=torch.finfo(compute_dtype).tiny)[..., None]
    out = out[:, :, :n].masked_fill(~valid[:, None, :, None], 0.0)
    return out.to(out_dtype)
