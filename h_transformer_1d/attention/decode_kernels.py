"""Triton kernels of one decoding step of `StaticHierarchicalCache` (attention/incremental.py).

The PyTorch step (`StaticHierarchicalCache.advance`) is about thirty small operations per layer; at
batch 1 on a GPU each is a kernel of a few microseconds, even inside a CUDA graph. Here a layer's
step is two launches:

- ``decode_level_kernel``, one program per (sequence, head, level): appends the new key to its
  level (a level-l group completing at position t holds k plus the left siblings of every level below,
  summed in that order, as in the PyTorch step), takes the new query where the level's group starts
  (or where the prompt left none), and runs an online softmax over that level's ring slots that are
  keys of t. The new row and query are used from registers, so no program reads what another writes.
  It leaves a softmax state per level: the running maximum, the sum of weights and the weighted values.
- ``decode_combine_kernel``, one program per (sequence, head): merges the levels' states into the
  output (one softmax over every level's keys), clears the "missing query" flags and advances the
  device position (after every program of the first launch has read it).

The position comes from a device tensor, so both launches are fixed-shape and a CUDA graph (or
torch.compile, which takes user Triton kernels) replays them for every token.
"""

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float64)
CHUNK = 64  # ring slots per iteration of a level program


@triton.jit
def decode_level_kernel(
    RING,
    QUERIES,
    MISSING,
    POS,
    Q,
    K,
    V,
    M_OUT,
    S_OUT,
    ACC_OUT,
    scale,
    # strides of the ring (rows, B, H, 2D + 1), the queries (levels, B, H, D), the missing flags (levels, B)
    # and q, k, v (B, H, D; the same for the three); the last dimensions are contiguous
    s_rr,
    s_rb,
    s_rh,
    s_ql,
    s_qb,
    s_qh,
    s_ml,
    s_mb,
    s_ib,
    s_ih,
    H: tl.constexpr,
    LEVELS: tl.constexpr,
    NR: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHUNK: tl.constexpr,
):
    bh = tl.program_id(0)
    lv = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = tl.load(POS)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    ring = RING + b * s_rb + h * s_rh
    below = (1 << lv) - 1
    group = t >> lv
    slot = group % (2 * NR)  # this level's row of t
    complete = ((t + 1) & below) == 0

    # the appended row: k (and v, count 1) plus the left sibling of every level below, in order
    inp = b * s_ib + h * s_ih + dd
    k_sum = tl.load(K + inp, mask=dmask, other=0.0).to(RING.dtype.element_ty)
    v_sum = tl.load(V + inp, mask=dmask, other=0.0).to(RING.dtype.element_ty)
    c_sum = tl.full([1], 1.0, RING.dtype.element_ty)
    for j in range(lv):
        sibling = ring + (j * 2 * NR + ((t >> j) + 2 * NR - 1) % (2 * NR)) * s_rr
        k_sum += tl.load(sibling + dd, mask=dmask, other=0.0)
        v_sum += tl.load(sibling + D + dd, mask=dmask, other=0.0)
        c_sum += tl.load(sibling + 2 * D + tl.arange(0, 1))
    row = ring + (lv * 2 * NR + slot) * s_rr
    # (a block mask and a scalar condition are combined with tl.where: `&` of the two gives int32 in
    # Triton's interpreter, which it then refuses as a mask)
    tl.store(row + dd, k_sum, mask=tl.where(complete, dmask, False))
    tl.store(row + D + dd, v_sum, mask=tl.where(complete, dmask, False))
    tl.store(row + 2 * D + tl.arange(0, 1), c_sum, mask=tl.where(complete, tl.full([1], 1, tl.int1), False))

    # the level's query: the new one where its group starts at t or the prompt left none
    missing = tl.load(MISSING + lv * s_ml + b * s_mb)
    take = ((t & below) == 0) | (missing != 0)
    query_at = QUERIES + lv * s_ql + b * s_qb + h * s_qh + dd
    # (cast after scaling: torch.compile may hand a Python float to the kernel as float64)
    q_new = (tl.load(Q + inp, mask=dmask, other=0.0).to(RING.dtype.element_ty) * scale).to(RING.dtype.element_ty)
    query = tl.where(take, q_new, tl.load(query_at, mask=dmask, other=0.0))
    tl.store(query_at, query, mask=tl.where(take, dmask, False))

    # which slots are keys of t: level 0 the positions of blocks c - 1 and c up to t; level l >= 1 the
    # groups of block c - 1 (its first half while t's group is in the first half of block c)
    block = group // NR
    start = ((block + 1) * NR) % (2 * NR)
    width = tl.where(group % NR >= NR // 2, NR, NR // 2)
    width = tl.where(block >= 1, width, 0)
    lowest = tl.maximum((block - 1) * NR, 0)

    m = tl.full([1], float("-inf"), RING.dtype.element_ty)
    s = tl.zeros([1], RING.dtype.element_ty)
    acc = tl.zeros([BLOCK_D], RING.dtype.element_ty)
    for c0 in range(0, 2 * NR, CHUNK):
        slots = c0 + tl.arange(0, CHUNK)
        real = slots < 2 * NR
        at = ring + (lv * 2 * NR + slots)[:, None] * s_rr
        tile = real[:, None] & dmask[None, :]
        new = tl.where(complete, slots == slot, False)
        keys = tl.where(new[:, None], k_sum[None, :], tl.load(at + dd[None, :], mask=tile, other=0.0))
        values = tl.where(new[:, None], v_sum[None, :], tl.load(at + D + dd[None, :], mask=tile, other=0.0))
        count = tl.load(ring + (lv * 2 * NR + slots) * s_rr + 2 * D, mask=real, other=0.0)
        count = tl.where(new, tl.sum(c_sum), count)
        fine_key = t - (t - slots + 2 * NR) % (2 * NR) >= lowest
        coarse_key = (slots - start + 2 * NR) % (2 * NR) < width
        is_key = tl.where(lv == 0, fine_key, coarse_key) & real
        count = tl.where(is_key, count, 0.0)
        denom = tl.maximum(count, 1.0)
        score = tl.sum(keys * query[None, :], 1) / denom
        score = tl.where(count > 0, score + tl.log(tl.maximum(count, 1e-30)), float("-inf"))
        m_new = tl.maximum(tl.max(m), tl.max(score))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(score - m_safe)
        alpha = tl.exp(m - m_safe)
        s = (s * alpha + tl.sum(p)).to(RING.dtype.element_ty)
        acc = (acc * tl.sum(alpha) + tl.sum((p / denom)[:, None] * values, 0)).to(RING.dtype.element_ty)
        m = (tl.zeros([1], RING.dtype.element_ty) + m_new).to(RING.dtype.element_ty)

    part = bh * LEVELS + lv
    tl.store(M_OUT + part + tl.arange(0, 1), m)
    tl.store(S_OUT + part + tl.arange(0, 1), s)
    tl.store(ACC_OUT + part * D + dd, acc, mask=dmask)


@triton.jit
def decode_combine_kernel(
    M_IN,
    S_IN,
    ACC_IN,
    OUT,
    MISSING,
    POS,
    s_ob,
    s_oh,  # out (B, H, D), last dim contiguous
    s_ml,
    s_mb,
    H: tl.constexpr,
    LEVELS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    ll = tl.arange(0, BLOCK_L)
    lmask = ll < LEVELS
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m = tl.load(M_IN + bh * LEVELS + ll, mask=lmask, other=float("-inf"))
    s = tl.load(S_IN + bh * LEVELS + ll, mask=lmask, other=0.0)
    acc = tl.load(
        ACC_IN + (bh * LEVELS + ll)[:, None] * D + dd[None, :], mask=lmask[:, None] & dmask[None, :], other=0.0
    )
    top = tl.max(m)  # finite: t is a key of itself at level 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * s)
    tl.store(OUT + b * s_ob + h * s_oh + dd, out.to(OUT.dtype.element_ty), mask=dmask)
    # every program of the level launch has read the flags and the position: clear and advance them
    tl.store(MISSING + ll * s_ml + b * s_mb, tl.zeros([BLOCK_L], tl.int1), mask=tl.where(h == 0, lmask, False))
    if bh == 0:
        t = tl.load(POS)
        tl.store(POS, t + 1)


def supports(ring: torch.Tensor, dim_head: int) -> bool:
    """Whether the kernels take this state: float32 or float64 sums (float64 through the interpreter
    only: some GPUs lack fast float64, and the PyTorch step is exact there)."""
    return ring.dtype in SUPPORTED_DTYPES and dim_head <= 256


def static_step(cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`StaticHierarchicalCache.advance(q, k, v)` in two launches: updates `cache`'s ring, queries,
    missing flags and position in place; returns the output (B, H, D) in q's dtype."""
    ring, queries, missing = cache.ring, cache.queries, cache.missing
    levels, b, h, d = queries.shape
    nr = cache.block_size
    scale = d**-0.5 if cache.scale is None else cache.scale
    dtype = q.dtype
    if ring.dtype == torch.float64:  # a Python float reaches the kernel as float32: scale on the host
        q, scale = q.to(torch.float64) * scale, 1.0
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != q.stride() or v.stride() != q.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    m = torch.empty(b * h * levels, device=ring.device, dtype=ring.dtype)
    s = torch.empty_like(m)
    acc = torch.empty(b * h * levels, d, device=ring.device, dtype=ring.dtype)
    out = torch.empty(b, h, d, device=ring.device, dtype=dtype)
    block_d = triton.next_power_of_2(d)
    tensors = (ring, queries, missing, cache.position, q, k, v, m, s, acc)
    strides = (*ring.stride()[:3], *queries.stride()[:3], *missing.stride(), *q.stride()[:2])
    chunk = min(CHUNK, triton.next_power_of_2(2 * nr))
    decode_level_kernel[(b * h, levels)](
        *tensors, scale, *strides, H=h, LEVELS=levels, NR=nr, D=d, BLOCK_D=block_d, CHUNK=chunk
    )
    tensors = (m, s, acc, out, missing, cache.position)
    strides = (*out.stride()[:2], *missing.stride())
    block_l = triton.next_power_of_2(levels)
    decode_combine_kernel[(b * h,)](*tensors, *strides, H=h, LEVELS=levels, BLOCK_L=block_l, D=d, BLOCK_D=block_d)
    return out
