"""Triton kernels of one decoding step of `StaticHierarchicalCache` (attention/incremental.py).

The PyTorch step (`StaticHierarchicalCache.advance`) is about thirty small operations per layer; at
batch 1 on a GPU each is a kernel of a few microseconds, even inside a CUDA graph. Here a layer's
step is two launches:

- ``decode_level_kernel``, one program per (sequence, head, level, chunk of CHUNK ring slots): each
  turns q and k by the position's rotary angles as it loads them (when given: this saves the
  rotation's seven element-wise kernels per layer), sums the new row of its level (a level-l
  group completing at position t holds k plus the left siblings of every level below; the siblings
  are loaded as one tile), and the program holding t's slot writes it; each takes the new query
  where the level's group starts (or where the prompt left none; the level's first program writes
  it), and computes the softmax state of its slots that are keys of t: the maximum score, the sum of
  weights and the weighted values. The new row and query are used from registers, so no program
  reads what another writes.
- ``decode_combine_kernel``, one program per (sequence, head): merges the levels' and chunks' states
  into the output (one softmax over every level's keys), clears the "missing query" flags and
  advances the device position (after every program of the first launch has read them).

Every program does a fixed, small amount of work with no loop over levels or slots: at batch 1 the
step is bound by latency, not bandwidth. The position comes from a device tensor, so both launches
are fixed-shape and a CUDA graph (or torch.compile, which takes user Triton kernels) replays them for
every token.
"""

import torch
import triton
import triton.language as tl

from .fused import launch_device

SUPPORTED_DTYPES = (torch.float32, torch.float64)
# the level launch's ring slots and warps per program: at batch 1 a step is a few small programs, and one
# warp over 32 slots was the fastest of the settings tried
CHUNK = 32
LEVEL_WARPS = 1


@triton.jit
def _rotated(X, COS, SIN, dd, dmask, ROTARY: tl.constexpr):
    """The vector at X (features dd), turned by the rotary angles whose cos and sin (D/2 each) are at COS
    and SIN when ROTARY: each pair (2i, 2i+1) as `rotary.rotate` turns it, in cos's dtype, returned in
    X's dtype."""
    x = tl.load(X + dd, mask=dmask, other=0.0)
    if ROTARY:
        RT = COS.dtype.element_ty
        partner = tl.load(X + (dd ^ 1), mask=dmask, other=0.0).to(RT)  # the other feature of the pair
        cos = tl.load(COS + dd // 2, mask=dmask, other=1.0)
        sin = tl.load(SIN + dd // 2, mask=dmask, other=0.0)
        # (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
        turned = x.to(RT) * cos + tl.where(dd % 2 == 0, -partner, partner) * sin
        x = turned.to(X.dtype.element_ty)
    return x


@triton.jit
def decode_level_kernel(
    RING,
    QUERIES,
    MISSING,
    POS,
    Q,
    K,
    V,
    COS,
    SIN,
    M_OUT,
    S_OUT,
    ACC_OUT,
    scale,
    # strides of the ring (rows, B, H / G, 2D + 1), the queries (levels, B, H, D), the missing flags
    # (levels, B) and q (B, H, D), k, v (B, H / G, D each); the last dimensions are contiguous
    s_rr,
    s_rb,
    s_rh,
    s_ql,
    s_qb,
    s_qh,
    s_ml,
    s_mb,
    s_nqb,
    s_nqh,
    s_nkb,
    s_nkh,
    s_nvb,
    s_nvh,
    H: tl.constexpr,
    G: tl.constexpr,
    LEVELS: tl.constexpr,
    NR: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS: tl.constexpr,
    ROTARY: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh = tl.program_id(0)
    lv = tl.program_id(1)
    ch = tl.program_id(2)
    DT = RING.dtype.element_ty
    b = bh // H
    h = bh % H
    hk = h // G  # grouped-query attention: the query head's kv head, whose ring row the group's G programs share
    if ROWS:  # a position per row, and rotary angles per row (B, 1, D/2), contiguous
        t = tl.load(POS + b)
        COS += b * (D // 2)
        SIN += b * (D // 2)
    else:
        t = tl.load(POS)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    ring = RING + b * s_rb + hk * s_rh
    below = (1 << lv) - 1
    group = t >> lv
    slot = group % (2 * NR)  # this level's row of t
    complete = ((t + 1) & below) == 0
    slots = ch * CHUNK + tl.arange(0, CHUNK)  # this program's ring slots
    real = slots < 2 * NR
    # (a block mask and a scalar condition are combined with tl.where: `&` of the two gives int32 in
    # Triton's interpreter, which it then refuses as a mask)
    mine = tl.where(complete, slots == slot, False)  # the slot that takes the new row, if here

    # the appended row: k (and v, count 1) plus the left sibling of every level below, loaded as one tile
    jj = tl.arange(0, BLOCK_L)
    below_j = jj < lv
    sibling = (jj * 2 * NR + ((t >> jj) + 2 * NR - 1) % (2 * NR)) * s_rr  # (BLOCK_L,)
    tile_j = below_j[:, None] & dmask[None, :]
    k_sum = _rotated(K + b * s_nkb + hk * s_nkh, COS, SIN, dd, dmask, ROTARY).to(DT)
    v_sum = tl.load(V + b * s_nvb + hk * s_nvh + dd, mask=dmask, other=0.0).to(DT)
    k_sum += tl.sum(tl.load(ring + sibling[:, None] + dd[None, :], mask=tile_j, other=0.0), 0)
    v_sum += tl.sum(tl.load(ring + sibling[:, None] + D + dd[None, :], mask=tile_j, other=0.0), 0)
    c_sum = 1.0 + tl.sum(tl.load(ring + sibling + 2 * D, mask=below_j, other=0.0), 0)
    row = ring + (lv * 2 * NR + slot) * s_rr
    # complete, and t's slot is among this program's; one query head per group writes (the others use the
    # same row from registers)
    writes = tl.where(h % G == 0, tl.max(mine.to(tl.int32), 0) > 0, False)
    tl.store(row + dd, k_sum, mask=tl.where(writes, dmask, False))
    tl.store(row + D + dd, v_sum, mask=tl.where(writes, dmask, False))
    tl.store(
        row + 2 * D + tl.arange(0, 1), tl.zeros([1], DT) + c_sum, mask=tl.where(writes, tl.arange(0, 1) == 0, False)
    )

    # the level's query: the new one where its group starts at t or the prompt left none (stored by
    # the level's first program)
    missing = tl.load(MISSING + lv * s_ml + b * s_mb)
    take = ((t & below) == 0) | (missing != 0)
    query_at = QUERIES + lv * s_ql + b * s_qb + h * s_qh + dd
    # (cast after scaling: torch.compile may hand a Python float to the kernel as float64)
    q_new = (_rotated(Q + b * s_nqb + h * s_nqh, COS, SIN, dd, dmask, ROTARY).to(DT) * scale).to(DT)
    query = tl.where(take, q_new, tl.load(query_at, mask=dmask, other=0.0))
    tl.store(query_at, query, mask=tl.where(take & (ch == 0), dmask, False))

    # which slots are keys of t: level 0 the positions of blocks c - 1 and c up to t; level l >= 1 the
    # groups of block c - 1 (its first half while t's group is in the first half of block c)
    block = group // NR
    start = ((block + 1) * NR) % (2 * NR)
    width = tl.where(group % NR >= NR // 2, NR, NR // 2)
    width = tl.where(block >= 1, width, 0)
    lowest = tl.maximum((block - 1) * NR, 0)
    fine_key = t - (t - slots + 2 * NR) % (2 * NR) >= lowest
    coarse_key = (slots - start + 2 * NR) % (2 * NR) < width
    is_key = tl.where(lv == 0, fine_key, coarse_key) & real

    # this chunk's softmax state
    at = ring + (lv * 2 * NR + slots)[:, None] * s_rr
    tile = real[:, None] & dmask[None, :]
    keys = tl.where(mine[:, None], k_sum[None, :], tl.load(at + dd[None, :], mask=tile, other=0.0))
    values = tl.where(mine[:, None], v_sum[None, :], tl.load(at + D + dd[None, :], mask=tile, other=0.0))
    count = tl.load(ring + (lv * 2 * NR + slots) * s_rr + 2 * D, mask=real, other=0.0)
    count = tl.where(mine, c_sum, count)
    count = tl.where(is_key, count, 0.0)
    denom = tl.maximum(count, 1.0)
    score = tl.sum(keys * query[None, :], 1) / denom
    score = tl.where(count > 0, score + tl.log(tl.maximum(count, 1e-30)), float("-inf")).to(DT)
    m = tl.max(score, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(score - m_safe)
    part = bh * (LEVELS * CHUNKS) + lv * CHUNKS + ch
    tl.store(M_OUT + part + tl.arange(0, 1), tl.zeros([1], DT) + m)
    tl.store(S_OUT + part + tl.arange(0, 1), tl.zeros([1], DT) + tl.sum(p, 0))
    tl.store(ACC_OUT + part * D + dd, tl.sum((p / denom)[:, None] * values, 0).to(DT), mask=dmask)


@triton.jit
def decode_combine_kernel(
    M_IN,
    S_IN,
    ACC_IN,
    OUT,
    MISSING,
    POS,
    # strides of the output (B, H, D; last dimension contiguous) and the missing flags (levels, B)
    s_ob,
    s_oh,
    s_ml,
    s_mb,
    H: tl.constexpr,
    LEVELS: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_L: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    pp = tl.arange(0, BLOCK_P)
    pmask = pp < PARTS
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    m = tl.load(M_IN + bh * PARTS + pp, mask=pmask, other=float("-inf"))
    s = tl.load(S_IN + bh * PARTS + pp, mask=pmask, other=0.0)
    acc = tl.load(
        ACC_IN + (bh * PARTS + pp)[:, None] * D + dd[None, :], mask=pmask[:, None] & dmask[None, :], other=0.0
    )
    top = tl.max(m)  # finite: t is a key of itself at level 0
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * s)
    tl.store(OUT + b * s_ob + h * s_oh + dd, out.to(OUT.dtype.element_ty), mask=dmask)
    # every program of the level launch has read the flags and the position: clear and advance them
    ll = tl.arange(0, BLOCK_L)
    tl.store(MISSING + ll * s_ml + b * s_mb, tl.zeros([BLOCK_L], tl.int1), mask=tl.where(h == 0, ll < LEVELS, False))
    if ROWS:  # each row's position, by the row's first head
        if h == 0:
            t = tl.load(POS + b)
            tl.store(POS + b, t + 1)
    elif bh == 0:
        t = tl.load(POS)
        tl.store(POS, t + 1)


def supports(ring: torch.Tensor, dim_head: int) -> bool:
    """Whether the kernels take this state: float32 or float64 sums (`StaticHierarchicalCache` picks
    them by default for float32 only: many GPUs have slow float64)."""
    return ring.dtype in SUPPORTED_DTYPES and dim_head <= 256


def static_step(cache, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary=None) -> torch.Tensor:
    """`StaticHierarchicalCache.advance(q, k, v, rotary=rotary)` in two launches: updates `cache`'s ring,
    queries, missing flags and position in place; returns the output (B, H, D) in q's dtype (q (B, H, D),
    k, v (B, Hkv, D)).
    `rotary`: (cos, sin), each (D/2,) (a position per row: (B, 1, D/2)), to turn q and k by inside the level
    launch (as `rotary.rotate`)."""
    with launch_device(q):
        return _static_step(cache, q, k, v, rotary)


def _static_step(cache, q, k, v, rotary):
    ring, queries, missing = cache.ring, cache.queries, cache.missing
    levels, b, h, d = queries.shape
    hkv = ring.shape[2]
    nr = cache.block_size
    scale = d**-0.5 if cache.scale is None else cache.scale
    dtype = q.dtype
    if ring.dtype == torch.float64:  # a Python float reaches the kernel as float32: scale on the host
        q, scale = q.to(torch.float64) * scale, 1.0  # (before turning it: the same to rounding)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # (q stands in for the pointers the kernel does not read without rotary; shapes: checked by `step`)
    cos, sin = (q, q) if rotary is None else (x if x.is_contiguous() else x.contiguous() for x in rotary)
    block_d, block_l = triton.next_power_of_2(d), triton.next_power_of_2(levels)
    if CHUNK < 1 or CHUNK & (CHUNK - 1):  # a module setting: checked where it is read
        raise ValueError(f"decode_kernels.CHUNK must be a power of two, got {CHUNK}")
    chunk = min(CHUNK, triton.next_power_of_2(2 * nr))
    chunks = triton.cdiv(2 * nr, chunk)
    parts = levels * chunks  # softmax states per (sequence, head)
    m = torch.empty(b * h * parts, device=ring.device, dtype=ring.dtype)
    s = torch.empty_like(m)
    acc = torch.empty(b * h * parts, d, device=ring.device, dtype=ring.dtype)
    out = torch.empty(b, h, d, device=ring.device, dtype=dtype)
    tensors = (ring, queries, missing, cache.position, q, k, v, cos, sin, m, s, acc)
    strides = (
        *ring.stride()[:3],
        *queries.stride()[:3],
        *missing.stride(),
        *q.stride()[:2],
        *k.stride()[:2],
        *v.stride()[:2],
    )
    decode_level_kernel[(b * h, levels, chunks)](
        *tensors,
        scale,
        *strides,
        H=h,
        G=h // hkv,
        LEVELS=levels,
        NR=nr,
        D=d,
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        CHUNK=chunk,
        CHUNKS=chunks,
        ROTARY=rotary is not None,
        ROWS=cache.position.dim() == 1,
        num_warps=LEVEL_WARPS,
    )
    tensors = (m, s, acc, out, missing, cache.position)
    strides = (*out.stride()[:2], *missing.stride())
    block_p = triton.next_power_of_2(parts)
    decode_combine_kernel[(b * h,)](
        *tensors, *strides, H=h, LEVELS=levels, PARTS=parts, BLOCK_P=block_p, BLOCK_L=block_l, D=d, BLOCK_D=block_d,
        ROWS=cache.position.dim() == 1,
    )
    return out
