"""Hierarchical attention in blocked PyTorch: O(N * block_size) work, O(N) memory, any device.

Each level is computed at its own resolution as a batch of small windows, yielding per query a
running max ``m``, a sum of weights ``l`` and a weighted sum of values ``o``. Levels are merged coarse
to fine with log-sum-exp arithmetic, so the whole row shares one softmax (docs/design.md).

Without dropout this runs as one autograd node (`_HierarchicalAttention`) that goes through the
windows chunk by chunk and recomputes the scores in backward, so no score tensor is ever stored;
with dropout every operation is recorded by autograd (`_blocked_autograd`).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .geometry import effective_block_size, level_lengths, window_offsets


class Partial(NamedTuple):
    """Unnormalised softmax state per query: max score, sum of weights, weighted sum of values.

    A query with no key has m = -inf (and l = 0, o = 0): it never sets the maximum of a merge, so the
    weights of the levels that have keys stay relative to their own maximum, whatever their scale."""

    m: torch.Tensor  # (B, H, M)
    l: torch.Tensor  # (B, H, M)
    o: torch.Tensor  # (B, H, M, D)


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """m with -inf (the maximum of no key) replaced by 0: the reference to subtract before exponentiating,
    so that -inf - -inf never makes a NaN (every weight of such a row is exp(-inf) = 0)."""
    return torch.where(m == -math.inf, 0.0, m)


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad or truncate dim 2 (the sequence) of a (B, H|1, N, ...) tensor to `length`."""
    n = x.shape[2]
    if n >= length:
        return x[:, :, :length]
    if _recorded(x):
        return F.pad(x, [0, 0] * (x.dim() - 3) + [0, length - n])
    # F.pad fills all of the new tensor, then copies: write the body once and zero only the tail
    out = x.new_empty(*x.shape[:2], length, *x.shape[3:])
    out[:, :, :n] = x
    out[:, :, n:] = 0
    return out


def _shift_blocks(xb: torch.Tensor, offset: int) -> torch.Tensor:
    """result[..., c, :, ...] = xb[..., c + offset, :, ...] along the block dim 2, zero outside."""
    if offset < 0:
        return F.pad(xb, [0, 0] * (xb.dim() - 3) + [-offset, 0])[:, :, : xb.shape[2]]
    return F.pad(xb, [0, 0] * (xb.dim() - 3) + [0, offset])[:, :, offset:]


def window_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout_p: float
) -> Partial:
    """Softmax state of block queries q (...,nb,R,D) over window keys k, v (...,nb,K,D) (leading dims
    broadcast: grouped-query attention shares a kv head among a group of query heads).

    `bias` broadcasts to (...,nb,R,K): 0 or log(count) for a key, -inf where it is not attended.
    """
    # in place after the matmul: one score-sized buffer instead of three (these dominate memory)
    scores = (q @ k.transpose(-1, -2)).add_(bias)
    with torch.no_grad():
        m = scores.amax(-1, keepdim=True)  # -inf for a row with no key: all its weights become 0
    p = scores.sub_(finite_or_zero(m)).exp_()
    l = p.sum(-1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    o = p @ v
    *lead, nb, r, d = o.shape
    return Partial(m.reshape(*lead, nb * r), l.reshape(*lead, nb * r), o.reshape(*lead, nb * r, d))


def merge(a: Partial, b: Partial) -> Partial:
    """The softmax state of the union of the keys of a and b (log-sum-exp arithmetic)."""
    m = torch.maximum(a.m, b.m)
    ref = finite_or_zero(m)
    wa, wb = torch.exp(a.m - ref), torch.exp(b.m - ref)
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
    """One level: queries q (B,H,M,D) and keys k, v (B,Hkv,M,D) at that level's resolution, counts (B,M).
    The G = H / Hkv query heads of a kv head meet its windows by broadcasting: no copy of k or v per head."""
    offsets = window_offsets(causal, level)
    b, h, m, d = q.shape
    hkv = k.shape[1]
    bias = _key_bias(_masked_log(count), nr, offsets)
    allowed = _level_mask(nr, causal, level, q.device)
    bias = bias.masked_fill(~allowed, float("-inf"))[:, :, None]  # (B,1,1,nb,1,K)
    part = window_partial(
        q.reshape(b, hkv, h // hkv, m // nr, nr, d),
        _window(k, nr, offsets)[:, :, None],
        _window(v, nr, offsets)[:, :, None],
        bias,
        dropout_p,
    )
    return Partial(part.m.reshape(b, h, m), part.l.reshape(b, h, m), part.o.reshape(b, h, m, -1))


def _recorded(x: torch.Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


def _pair_sum(x: torch.Tensor, length: int) -> torch.Tensor:
    """Sums of aligned pairs along dim 2 of x (B, H|1, M, ...), M even, as `length` rows (zero beyond M/2)."""
    half = x.shape[2] // 2
    if half == length:
        return torch.add(x[:, :, 0::2], x[:, :, 1::2])
    if _recorded(x):  # out= has no autograd: pad a copy instead
        return _pad_seq(torch.add(x[:, :, 0::2], x[:, :, 1::2]), length)
    res = x.new_empty(*x.shape[:2], length, *x.shape[3:])
    torch.add(x[:, :, 0::2], x[:, :, 1::2], out=res[:, :, :half])
    res[:, :, half:].zero_()
    return res


def _pair_first(x: torch.Tensor, count: torch.Tensor, length: int) -> torch.Tensor:
    """For each aligned pair along dim 2 of x (B, H|1, M, D), M even, the left member if its group has a
    valid position (count (B, M)), else the right; `length` rows, zero beyond M/2."""
    half = x.shape[2] // 2
    pairs = x.reshape(*x.shape[:2], half, 2, x.shape[3])
    left = (count.reshape(count.shape[0], 1, half, 2)[..., 0] > 0)[..., None]
    if half == length:
        return torch.where(left, pairs[:, :, :, 0], pairs[:, :, :, 1])
    if _recorded(x):
        return _pad_seq(torch.where(left, pairs[:, :, :, 0], pairs[:, :, :, 1]), length)
    res = x.new_empty(*x.shape[:2], length, x.shape[3])
    torch.where(left, pairs[:, :, :, 0], pairs[:, :, :, 1], out=res[:, :, :half])
    res[:, :, half:].zero_()
    return res


def coarse_levels(q0, k0, v0, count, lengths: list[int], causal: bool):
    """Yield, for levels 1.., the coarse (query, mean key, mean value, count), each (B,H,lengths[l],D).

    q0, k0, v0 (B,H,lengths[0],D) hold the fine level with padded content zeroed; count (B,
    lengths[0]) is 1 for a real token, all in the compute dtype. Coarse queries are means over valid
    positions, or for the causal variant the first valid position's query.
    """
    q_acc, k_acc, v_acc, c_acc = q0, k0, v0, count
    for length in lengths[1:]:
        q_acc = _pair_first(q_acc, c_acc, length) if causal else _pair_sum(q_acc, length)
        k_acc, v_acc = _pair_sum(k_acc, length), _pair_sum(v_acc, length)
        c_acc = _pair_sum(c_acc[:, None], length)[:, 0]
        denom = c_acc.clamp(min=1.0)[:, None, :, None]
        yield (q_acc if causal else q_acc / denom), k_acc / denom, v_acc / denom, c_acc


def _blocked_autograd(q0, k0, v0, count, lengths, nr, causal, dropout_p):
    """Merged softmax state of the fine level, every operation recorded by autograd (dropout)."""
    top = len(lengths) - 1
    fine = _attend(q0, k0, v0, count, nr, causal, 0, dropout_p)
    coarse = [
        _attend(q_l, k_l, v_l, c_l, nr, causal, level, dropout_p)
        for level, (q_l, k_l, v_l, c_l) in enumerate(coarse_levels(q0, k0, v0, count, lengths, causal), start=1)
    ]
    # merge coarse to fine: every level's state is shared by the whole group below it
    state = None
    for level in range(top, 0, -1):
        part = coarse[level - 1]
        state = part if state is None else merge(_upsample(state, lengths[level]), part)
    return fine if state is None else merge(_upsample(state, lengths[0]), fine)


# ---------------------------------------------------------------------------------------------
# Without dropout: one autograd node whose scores are made chunk by chunk and never stored.
#
# The heads are taken a group at a time (a few MB of fine-level data, so a group's buffers stay in
# cache and no buffer grows with B*H). In a group, the levels run coarse to fine; a level's window
# attention goes through its blocks in chunks whose scores fit the core's cache, and its (m, l, o)
# are merged in place with the coarser state. Kept for backward: the merged row maxima of every level,
# the fine rows' log-sum-exp and the output. Scores are in base 2 (exp2 has no slow path for -inf or
# underflowing arguments, where exp is ten to a hundred times slower on CPU).
#
# Backward is FlashAttention's with a hierarchy. With lse_i of fine row i, delta_i = dO_i . O_i and M_g
# the merged max of a coarse row g, the scores of g get dS = exp(S - M_g) * (A_g . v - C_g), where
# A_g = sum_{i in g} exp(M_g - lse_i) dO_i and C_g the same sum of delta_i (weights <= 1, made level by
# level as pair sums). The coarse queries, keys and values then pass their gradients down to the fine
# level through the means (or, causal queries, the first valid position) that made them.

_LOG2E = 1.4426950408889634
CHUNK_ELEMENTS_CPU = 1 << 19  # scores per chunk and thread
CHUNK_ELEMENTS_GPU = 1 << 26
GROUP_BYTES = 1 << 22  # fine-level bytes of one of q, k, v in a group of heads


def _chunk_blocks(nr: int, width: int, device) -> int:
    elements = CHUNK_ELEMENTS_GPU if device.type != "cpu" else CHUNK_ELEMENTS_CPU * max(1, torch.get_num_threads())
    return max(1, elements // (nr * width))


def _groups(x: int, m0: int, d: int, elt: int, device) -> list[tuple[int, int]]:
    """Ranges of the X = B*H heads done together: groups of about GROUP_BYTES of fine-level data,
    their number rounded (not rounded up), so a length just past a power of two does not add a group."""
    if device.type != "cpu":
        return [(0, x)]
    count = max(1, min(x, round(x * m0 * d * elt / GROUP_BYTES)))
    size = -(-x // count)
    return [(x0, min(x0 + size, x)) for x0 in range(0, x, size)]


def _segments(offsets: tuple[int, ...]) -> list[tuple[int, int]]:
    """Runs of consecutive offsets as (first offset, number of blocks)."""
    runs: list[list[int]] = []
    for off in offsets:
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += 1
        else:
            runs.append([off, 1])
    return [(a, b) for a, b in runs]


class _LevelMeta(NamedTuple):
    """What a level's masking needs, for all X heads: counts (X, M), biases in base 2."""

    count: torch.Tensor  # (X, M): valid positions per group
    key_bias: torch.Tensor  # (X*nb, K): log2(count) per window key, -inf for no key
    mask_bias: torch.Tensor | None  # (R, K): 0 or -inf per (query row, window key); None: all 0
    offsets: tuple[int, ...]


def _level_metas(valid: torch.Tensor, lengths: list[int], nr: int, causal: bool, dtype) -> list[_LevelMeta]:
    metas = []
    count = _pad_seq(valid[:, None].to(dtype), lengths[0])[:, 0]
    for level, length in enumerate(lengths):
        if level:
            count = _pair_sum(count[:, None], length)[:, 0]
        offsets = window_offsets(causal, level)
        key_bias = _key_bias(torch.log2(count), nr, offsets).reshape(-1, len(offsets) * nr)
        mask_bias = None
        if causal or level:
            allowed = _level_mask(nr, causal, level, valid.device)
            mask_bias = torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, -math.inf)
        metas.append(_LevelMeta(count, key_bias, mask_bias, offsets))
    return metas


class _Level(NamedTuple):
    """One level of a group, flattened to nblk blocks of R positions. Its window is made of segments of
    adjacent key blocks (all of one width W): the scores of a chunk of n blocks are (segments, n, R, W)."""

    q: torch.Tensor  # (nblk, R, D)
    k: torch.Tensor  # (nblk*R, D)
    v: torch.Tensor  # (nblk*R, D)
    key_bias: torch.Tensor  # (nblk, segments, W)
    mask_bias: torch.Tensor | None  # (segments, 1, R, W)
    offsets: tuple[int, ...]
    segments: list[tuple[int, int]]


def _make_level(q, k, v, meta: _LevelMeta, x0: int, x1: int, nr: int) -> _Level:
    """The level of heads x0 .. x1-1 from its q, k, v (G, 1, M, D)."""
    d = q.shape[-1]
    nb = q.shape[2] // nr
    segments = _segments(meta.offsets)
    ns = len(segments)
    key_bias = meta.key_bias[x0 * nb : x1 * nb].view(-1, ns, len(meta.offsets) * nr // ns)
    mask_bias = None
    if meta.mask_bias is not None:
        mask_bias = meta.mask_bias.view(nr, ns, -1).permute(1, 0, 2)[:, None]
    return _Level(
        q.reshape(-1, nr, d), k.reshape(-1, d), v.reshape(-1, v.shape[-1]), key_bias, mask_bias, meta.offsets, segments
    )


def _window_rows(x: torch.Tensor, i0: int, i1: int, offsets: tuple[int, ...], nr: int) -> tuple[torch.Tensor, int]:
    """(rows, base): rows holding blocks base, base+1, .. with every window of blocks i0 .. i1-1.

    Inside the sequence these are x itself: a window may reach into the neighbouring head's blocks,
    whose keys carry a -inf bias. Only the chunks at the two ends of x get a small zero-padded copy.
    """
    nblk = x.shape[0] // nr
    first, last = i0 + offsets[0], i1 + offsets[-1]
    if first >= 0 and last <= nblk:
        return x, 0
    rows = x.new_zeros((last - first) * nr, x.shape[1])
    lo, hi = max(first, 0), min(last, nblk)
    rows[(lo - first) * nr : (hi - first) * nr] = x[lo * nr : hi * nr]
    return rows, first


def _chunk_windows(lv: _Level, x: torch.Tensor, i0: int, i1: int, nr: int) -> list[torch.Tensor]:
    """Per segment, the key (or value) windows of blocks i0 .. i1-1: overlapping (n, W, D) views."""
    rows, base = _window_rows(x, i0, i1, lv.offsets, nr)
    d = x.shape[-1]
    return [
        rows[(i0 + off - base) * nr :].as_strided((i1 - i0, blocks * nr, d), (nr * d, d, 1))
        for off, blocks in lv.segments
    ]


def _scores_into(s, lv: _Level, i0: int, scale: float, keys, shift=None) -> None:
    """s (segments, n, R, W) := base-2 scores log2(e) * scale * q k^T + biases (- shift (n, R)) of the
    blocks i0 .. i0+n-1."""
    n = s.shape[1]
    kb = lv.key_bias[i0 : i0 + n].permute(1, 0, 2)[:, :, None]
    if shift is not None:
        torch.sub(kb, shift[None, :, :, None], out=s)
        if lv.mask_bias is not None:
            s.add_(lv.mask_bias)
    elif lv.mask_bias is not None:
        torch.add(kb, lv.mask_bias, out=s)
    else:
        s.copy_(kb)
    qc = lv.q[i0 : i0 + n]
    for sj, kw in zip(s, keys):
        sj.baddbmm_(qc, kw.transpose(1, 2), alpha=scale * _LOG2E)


def _row_reduce(op, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """op (torch.amax or torch.sum) of s (segments, n, R, W) over its segments and columns, into out (n, R)."""
    return op(s[0], -1, out=out) if s.shape[0] == 1 else op(s, (0, 3), out=out)


def _window_forward(lv: _Level, nr: int, scale: float, o=None):
    """Per query row of the level: own max m (base 2; -inf for a row with no key), sum of weights l and
    weighted sum of values o (written into `o` (nblk, R, Dv) if given)."""
    nblk = lv.q.shape[0]
    width = len(lv.offsets) * nr
    ns = len(lv.segments)
    m, l = lv.q.new_empty(nblk, nr), lv.q.new_empty(nblk, nr)
    if o is None:
        o = lv.q.new_empty(nblk, nr, lv.v.shape[-1])
    step = _chunk_blocks(nr, width, lv.q.device)
    buf = lv.q.new_empty(ns, min(step, nblk), nr, width // ns)
    for i0 in range(0, nblk, step):
        i1 = min(i0 + step, nblk)
        s = buf[:, : i1 - i0]
        _scores_into(s, lv, i0, scale, _chunk_windows(lv, lv.k, i0, i1, nr))
        mc = _row_reduce(torch.amax, s, m[i0:i1])
        s.sub_(finite_or_zero(mc)[None, :, :, None]).exp2_()
        _row_reduce(torch.sum, s, l[i0:i1])
        for j, (sj, vw) in enumerate(zip(s, _chunk_windows(lv, lv.v, i0, i1, nr))):
            o[i0:i1].baddbmm_(sj, vw, beta=1.0 if j else 0.0)
    return m, l, o


def _window_backward(lv: _Level, nr: int, scale: float, ref, do, c=None, out=None, into=None):
    """Gradients dq (nblk, R, D), dk (nblk*R, D), dv (nblk*R, Dv) of one level, and c.

    Weights are exp2(S - ref) for the base-2 row reference `ref` (nblk, R), finite or +inf (a row
    without keys); `do` (nblk, R, Dv) and `c` (nblk, R) are the sums A and C above: dS = weights *
    (do . v - c). For the fine level (ref = lse) pass `out` (nblk, R, Dv) instead of c: c = delta =
    rowsum(do * out) is made here. `into`: buffers for (dq, dk, dv).
    """
    nblk, _, d = lv.q.shape
    dv_dim = lv.v.shape[-1]
    width = len(lv.offsets) * nr
    ns = len(lv.segments)
    if out is not None:
        c = lv.q.new_empty(nblk, nr)
    if into is None:
        into = (torch.empty_like(lv.q), lv.q.new_empty(nblk * nr, d), lv.q.new_empty(nblk * nr, dv_dim))
    dq, dk, dv = into
    # a key block is first written (beta=0) by the largest offset reaching it; zero those it never reaches
    top = lv.offsets[-1]
    for t in (dk, dv):
        t[: max(top, 0) * nr].zero_()
        t[max(nblk + top, 0) * nr :].zero_()
    # (segment, block in the segment) of each offset, largest offset first
    columns = [(j, t, off + t) for j, (off, blocks) in enumerate(lv.segments) for t in range(blocks)][::-1]
    step = _chunk_blocks(nr, width, lv.q.device)
    pbuf = lv.q.new_empty(ns, min(step, nblk), nr, width // ns)
    gbuf = torch.empty_like(pbuf)
    for i0 in range(0, nblk, step):
        i1 = min(i0 + step, nblk)
        n = i1 - i0
        p, g = pbuf[:, :n], gbuf[:, :n]
        doc = do[i0:i1]
        if out is not None:
            torch.sum(doc * out[i0:i1], -1, out=c[i0:i1])
        keys = _chunk_windows(lv, lv.k, i0, i1, nr)
        _scores_into(p, lv, i0, scale, keys, ref[i0:i1])
        p.exp2_()
        for gj, vw in zip(g, _chunk_windows(lv, lv.v, i0, i1, nr)):
            gj.baddbmm_(doc, vw.transpose(1, 2), beta=0.0)
        g.sub_(c[None, i0:i1, :, None]).mul_(p)  # the gradient of the scores
        for j, (gj, kw) in enumerate(zip(g, keys)):
            dq[i0:i1].baddbmm_(gj, kw, beta=1.0 if j else 0.0, alpha=scale)
        for j, t, off in columns:
            lo, hi = max(i0, -off), min(i1, nblk - off)  # query blocks whose key block exists
            if lo >= hi:
                continue
            cols, rows = slice(t * nr, (t + 1) * nr), slice((lo + off) * nr, (hi + off) * nr)
            beta = 0.0 if off == top else 1.0
            gq, pq = g[j, lo - i0 : hi - i0, :, cols].transpose(1, 2), p[j, lo - i0 : hi - i0, :, cols].transpose(1, 2)
            dk[rows].view(hi - lo, nr, d).baddbmm_(gq, lv.q[lo:hi], beta=beta, alpha=scale)
            dv[rows].view(hi - lo, nr, dv_dim).baddbmm_(pq, do[lo:hi], beta=beta)
    return dq, dk, dv, c


def _pair_weighted_sum(x: torch.Tensor, w: torch.Tensor, length: int) -> torch.Tensor:
    """(G, L, ...), weights w (G, L/2, 2) -> (G, length, ...): w-weighted sums of aligned pairs, zero beyond."""
    xs, half = x.shape, x.shape[1] // 2
    pairs = x.reshape(xs[0], half, 2, *xs[2:])
    extra = (None,) * (x.dim() - 2)
    res = x.new_empty(xs[0], length, *xs[2:])
    res[:, half:].zero_()
    head = res[:, :half]
    torch.mul(pairs[:, :, 0], w[(slice(None), slice(None), 0, *extra)], out=head)
    head.addcmul_(pairs[:, :, 1], w[(slice(None), slice(None), 1, *extra)])
    return res


def _group_levels(q, k, v, metas, x0, x1, nr, causal, masked) -> list[_Level]:
    """Every level of heads x0 .. x1-1 (q, k, v (G, 1, M0, D|Dv), zero past N), the coarse ones as
    `coarse_levels` makes them."""
    lengths = [meta.count.shape[1] for meta in metas]
    counts = [meta.count[x0:x1] for meta in metas]
    if masked:  # selected, not multiplied: padded content (NaN, Inf) must not reach anything (0 * NaN is NaN)
        real = counts[0][:, None, :, None] > 0
        q, k, v = (torch.where(real, t, 0.0) for t in (q, k, v))
    inputs = [(q, k, v)]
    for level in range(1, len(lengths)):  # sums of sums, made means below
        q_acc, k_acc, v_acc = inputs[-1]
        q_acc = _pair_first(q_acc, counts[level - 1], lengths[level]) if causal else _pair_sum(q_acc, lengths[level])
        inputs.append((q_acc, _pair_sum(k_acc, lengths[level]), _pair_sum(v_acc, lengths[level])))
    for level in range(1, len(lengths)):
        denom = counts[level].clamp(min=1.0)[:, None, :, None]
        for t in inputs[level][int(causal) :]:
            t.div_(denom)
    return [_make_level(*inputs[lvl], metas[lvl], x0, x1, nr) for lvl in range(len(lengths))]


def _group_forward(q, k, v, valid, out, metas, x0, x1, nr, causal, scale, masked) -> list:
    """Writes the attention of heads x0 .. x1-1 (q, k (G, 1, M0, D), v, out (G, 1, M0, Dv), valid (G, M0),
    all padded to whole blocks) into out.

    Returns the merged base-2 row maxima of levels 1.. (-inf for a row without keys at that level or
    above) and, at index 0, the fine rows' log-sum-exp.
    """
    g, d = q.shape[0], v.shape[-1]
    levels = _group_levels(q, k, v, metas, x0, x1, nr, causal, masked)
    maxima: list = [None] * len(levels)
    state = None
    for lvl in range(len(levels) - 1, -1, -1):
        # the fine level straight into the output
        m, l, o = _window_forward(levels.pop(), nr, scale, out.view(-1, nr, d) if lvl == 0 else None)
        m, l, o = m.view(g, -1), l.view(g, -1), o.view(g, -1, d)
        if state is not None:  # merge with the coarser state, shared by both children of a group
            half = m.shape[1] // 2
            pm, pl, po = (t[:, :half, None] for t in state)
            mv, lv, ov = m.view(g, half, 2), l.view(g, half, 2), o.view(g, half, 2, d)
            mn = torch.maximum(mv, pm)
            ref = finite_or_zero(mn)
            wa, wb = (mv - ref).exp2_(), (pm - ref).exp2_()
            lv.mul_(wa).addcmul_(pl, wb)
            ov.mul_(wa[..., None]).addcmul_(po, wb[..., None])
            mv.copy_(mn)
        maxima[lvl] = m
        state = (m, l, o)
    m, l, o = state
    o.div_(l.clamp(min=torch.finfo(q.dtype).tiny)[..., None])
    maxima[0] = torch.where(l > 0, m + torch.log2(l), math.inf)  # lse; a row with no key gets no weight
    if masked:
        out.masked_fill_(~valid[:, None, :, None], 0.0)
    return maxima


def _group_backward(q, k, v, valid, out, maxima, dout, grads, metas, x0, x1, nr, causal, scale, masked) -> None:
    """Writes the gradients of heads x0 .. x1-1 (shapes as in `_group_forward`) into grads = (dq, dk, dv)."""
    g, d = q.shape[0], v.shape[-1]
    lengths = [meta.count.shape[1] for meta in metas]
    top = len(lengths) - 1
    levels = _group_levels(q, k, v, metas, x0, x1, nr, causal, masked)
    keep = valid[:, None, :, None]
    do = dout.masked_fill(~keep, 0.0) if masked else dout  # dout is zero in the padding
    do = do.reshape(-1, nr, d)
    # the fine level's gradients straight into grads; c = rowsum(dout * out) is made chunk by chunk
    into = (grads[0].view(-1, nr, q.shape[-1]), grads[1].view(-1, q.shape[-1]), grads[2].view(-1, d))
    fine_out = out.reshape(-1, nr, d)
    dq, dk, dv, c = _window_backward(levels[0], nr, scale, maxima[0].view(-1, nr), do, out=fine_out, into=into)
    level_grads = [(dq.view(g, -1, dq.shape[-1]), dk.view(g, -1, dk.shape[-1]), dv.view(g, -1, d))]
    a, c = do.view(g, -1, d), c.view(g, -1)
    for lvl in range(1, top + 1):
        half = lengths[lvl - 1] // 2
        # a coarse maximum is -inf only for a row without keys from this level up: its weight and its
        # scores' weights are 0 (a finite reference keeps -inf - -inf from making NaN)
        w = (maxima[lvl][:, :half, None] - finite_or_zero(maxima[lvl - 1]).view(g, half, 2)).exp2_()
        a, c = _pair_weighted_sum(a, w, lengths[lvl]), _pair_weighted_sum(c, w, lengths[lvl])
        dq, dk, dv, _ = _window_backward(
            levels[lvl], nr, scale, finite_or_zero(maxima[lvl]).view(-1, nr), a.view(-1, nr, d), c.view(-1, nr)
        )
        level_grads.append((dq.view(g, -1, dq.shape[-1]), dk.view(g, -1, dk.shape[-1]), dv.view(g, -1, d)))
    del a, c, levels
    # coarse to fine through the coarsening: a mean shares its gradient over the group (positions past
    # N get a share too, but the caller returns only the first N rows; masked positions are zeroed
    # below); a causal coarse query is its first valid position's
    counts = [meta.count[x0:x1] for meta in metas]
    for which in range(3):
        mean = which > 0 or not causal
        acc = None
        for lvl in range(top, -1, -1):
            grad = level_grads[lvl][which]
            width = grad.shape[-1]
            if lvl > 0 and mean:
                grad.div_(counts[lvl].clamp(min=1.0)[:, :, None])
            if acc is not None:
                half = lengths[lvl] // 2
                pairs, up = grad.view(g, half, 2, width), acc[:, :half]
                if mean:
                    pairs.add_(up[:, :, None])
                else:
                    first = (counts[lvl].view(g, half, 2)[..., 0] > 0)[..., None].to(grad.dtype)
                    pairs[:, :, 0].addcmul_(up, first)
                    pairs[:, :, 1].addcmul_(up, 1.0 - first)
            acc = grad
    if masked:
        for grad in level_grads[0]:
            grad.view(g, 1, -1, grad.shape[-1]).masked_fill_(~keep, 0.0)


def _head_ranges(grp: int, xkv: int, m0: int, d: int, elt: int, device):
    """(x0, x1, y0, y1): query heads x0 .. x1-1 done together and the kv heads y0 .. y1-1 they use.

    Query heads are ordered (group member j, kv head y): x = j * xkv + y, so the heads of one range use
    a contiguous range of kv heads, which the range reads in place (grouped-query attention repeats no
    k or v in memory)."""
    for j in range(grp):
        for y0, y1 in _groups(xkv, m0, d, elt, device):
            yield j * xkv + y0, j * xkv + y1, y0, y1


def _member_major(t: torch.Tensor, b: int, hkv: int) -> torch.Tensor:
    """(B, H, ...) with H = Hkv * G heads -> (G * B * Hkv, 1, ...) in the order of `_head_ranges`
    (a view when G = 1)."""
    grp = t.shape[1] // hkv
    t = t.reshape(b, hkv, grp, *t.shape[2:])
    return t.permute(2, 0, 1, *range(3, t.dim())).reshape(grp * b * hkv, 1, *t.shape[3:])


def _head_major(t: torch.Tensor, b: int, hkv: int) -> torch.Tensor:
    """The inverse of `_member_major`: (G * B * Hkv, 1, ...) -> (B, H, ...)."""
    grp = t.shape[0] // (b * hkv)
    t = t.reshape(grp, b, hkv, *t.shape[2:])
    return t.permute(1, 2, 0, *range(3, t.dim())).reshape(b, hkv * grp, *t.shape[3:])


class _HierarchicalAttention(torch.autograd.Function):
    # When N is not a multiple of the block size, q, k, v and the mask are padded once for all heads
    # (and kept for backward); the output (B, H, M0, Dv) is made whole, padded, and the caller keeps
    # its first N rows (so dO arrives padded with zeros); the gradients are made in padded buffers
    # whose first N rows are returned: no per-group padding, no copies of results here (autograd still
    # copies a gradient view into a leaf tensor's .grad). With grouped-query attention (k, v with Hkv
    # < H heads) the query heads are reordered so that every range of them reads its kv heads in place
    # (`_head_ranges`): q, the output and the gradients of q pay one reordering copy, k and v none.
    @staticmethod
    def forward(ctx, q, k, v, valid, nr, causal, scale, masked):
        b, h, n, d = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        grp, xkv = h // hkv, b * hkv
        lengths = level_lengths(n, nr)  # padded tokens per level
        m0 = lengths[0]
        qx = _pad_seq(_member_major(q, b, hkv), m0)
        kx, vx = (_pad_seq(t.reshape(xkv, 1, n, t.shape[-1]), m0) for t in (k, v))
        # (X, M0), False in the padding: query head x = j * xkv + y is batch row y // hkv
        valid_x = _pad_seq(valid.repeat_interleave(hkv, 0).repeat(grp, 1)[:, None], m0)[:, 0]
        metas = _level_metas(valid_x, lengths, nr, causal, q.dtype)
        out = q.new_empty(b, h, m0, dv) if grp == 1 else q.new_empty(b * h, 1, m0, dv)
        outx = out.view(b * h, 1, m0, dv)
        maxima = []
        for x0, x1, y0, y1 in _head_ranges(grp, xkv, m0, d, q.element_size(), q.device):
            sq, skv = slice(x0, x1), slice(y0, y1)
            args = (qx[sq], kx[skv], vx[skv], valid_x[sq], outx[sq], metas, x0, x1, nr, causal, scale, masked)
            maxima.append(_group_forward(*args))
        ctx.save_for_backward(qx, kx, vx, valid_x, out)
        ctx.maxima = maxima  # intermediates, neither inputs nor outputs
        ctx.conf = (nr, causal, scale, masked, lengths, (b, h, hkv, n, d, dv))
        # the caller cuts it to N rows: an output that is no view of another tensor
        return out if grp == 1 else _head_major(outx, b, hkv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        nr, causal, scale, masked, lengths, (b, h, hkv, n, d, dv) = ctx.conf
        qx, kx, vx, valid_x, out = ctx.saved_tensors
        grp, xkv, m0 = h // hkv, b * hkv, lengths[0]
        outx = out.view(b * h, 1, m0, dv)
        metas = _level_metas(valid_x, lengths, nr, causal, qx.dtype)
        dout = _member_major(dout, b, hkv)  # zero past N: the gradient of the caller's cut
        dq = outx.new_empty(b * h, 1, m0, d)
        dk, dv_ = (outx.new_empty(xkv, 1, m0, width) for width in (d, dv))
        ranges = _head_ranges(grp, xkv, m0, d, qx.element_size(), qx.device)
        for (x0, x1, y0, y1), maxima in zip(ranges, ctx.maxima):
            sq, skv = slice(x0, x1), slice(y0, y1)
            # a kv head's gradient is the sum over its query heads: the first member writes, the others add
            kv_grads = [dk[skv], dv_[skv]] if x0 < xkv else [torch.empty_like(dk[skv]), torch.empty_like(dv_[skv])]
            _group_backward(
                qx[sq], kx[skv], vx[skv], valid_x[sq], outx[sq], maxima, dout[sq], [dq[sq], *kv_grads],
                metas, x0, x1, nr, causal, scale, masked,
            )  # fmt: skip
            if x0 >= xkv:
                dk[skv].add_(kv_grads[0])
                dv_[skv].add_(kv_grads[1])
        dq = dq.view(b, h, m0, d) if grp == 1 else _head_major(dq, b, hkv)
        dk, dv_ = dk.view(b, hkv, m0, d), dv_.view(b, hkv, m0, dv)
        return (*(t[:, :, :n] for t in (dq, dk, dv_)), None, None, None, None, None)


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
    """Hierarchical attention on q (B, H, N, D), k (B, Hkv, N, D) and v (B, Hkv, N, Dv) (inputs assumed
    validated; H a multiple of Hkv); returns (B, H, N, Dv).

    When N is not a multiple of the block size, the float32/float64 result is the first N rows of a
    padded buffer: not contiguous (use .reshape rather than .view on it)."""
    b, _, n, d = q.shape
    nr = effective_block_size(n, block_size)
    out_dtype = q.dtype
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if scale is None else scale
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    if key_padding_mask is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
    else:
        valid = key_padding_mask.to(device=q.device, dtype=torch.bool)

    if dropout_p == 0.0 and not torch.compiler.is_compiling():
        out = _HierarchicalAttention.apply(q, k, v, valid, nr, causal, float(scale), key_padding_mask is not None)
        return out[:, :, :n].to(out_dtype) if out.shape[2] != n else out.to(out_dtype)

    lengths = level_lengths(n, nr)  # padded tokens per level
    count = _pad_seq(valid[:, None].to(compute_dtype), lengths[0])[:, 0]  # (B, M0)
    keep = count[:, None, :, None]
    # selected, not multiplied: padded content (NaN, Inf) must not reach anything (0 * NaN is NaN)
    q0, k0, v0 = (torch.where(keep > 0, _pad_seq(t, lengths[0]), 0.0) for t in (q * scale, k, v))
    state = _blocked_autograd(q0, k0, v0, count, lengths, nr, causal, dropout_p)
    out = state.o / state.l.clamp(min=torch.finfo(compute_dtype).tiny)[..., None]
    out = out[:, :, :n].masked_fill(~valid[:, None, :, None], 0.0)
    return out.to(out_dtype)
