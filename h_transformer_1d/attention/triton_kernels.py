"""Triton kernels for windowed block attention, the building block of every hierarchy level.

One kernel family serves all levels. A level is a sequence of tokens cut into blocks of NR; query
block c attends to the key blocks ``c + FIRST + w * STEP`` for ``w < NUM_WIN`` that lie inside its
level's range ``[lo[c], hi[c])`` (several coarse levels are packed into one launch, each its own
range). Structural masks: at level 0 the causal diagonal block is triangular; at coarse levels the
half-block correction of DESIGN.md applies. Each key carries ``log2(count)``: 0 for a real token,
-inf for padding or an empty group, log2(count) for a coarse token standing for `count` tokens.

Scores are kept in base 2: the caller folds ``scale`` into q and the kernels multiply by log2(e).
"""

import os

import triton
import triton.language as tl


def _configs(shapes):
    """Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages); one small one under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        shapes = [(16, 16, 1, 1), (32, 32, 1, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _fit_block(configs, nargs, **kwargs):
    """Tiles must divide the block size NR; keep the largest that fit."""
    nr = kwargs.get("NR", nargs.get("NR"))
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= nr and c.kwargs["BLOCK_N"] <= nr]
    if os.environ.get("TRITON_INTERPRET") == "1":
        return fitting[:1]  # the smallest tile: several tiles per block, so tiling is exercised
    return fitting


_KEY = ["NR", "D", "FIRST", "STEP", "NUM_WIN", "LEVEL0", "CAUSAL"]
_FWD_CONFIGS = _configs(
    [(128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 2, 2)]
)
_BWD_CONFIGS = _configs(
    [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 3), (16, 16, 2, 2)]
)


@triton.jit
def _scores(q, k, cnt, rows, cols, off, LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, NR: tl.constexpr):
    """Base-2 scores of a (BLOCK_M, D) query tile against a (BLOCK_N, D) key tile, masks applied."""
    s = tl.dot(q, tl.trans(k)) * 1.4426950408889634
    s = s + tl.where(cnt > 0, tl.log2(tl.maximum(cnt, 1e-30)), float("-inf"))[None, :]
    if LEVEL0:
        if CAUSAL:
            s = tl.where((off != 0) | (cols[None, :] <= rows[:, None]), s, float("-inf"))
    else:
        half = NR // 2
        skip_prev = (off < 0) & (rows[:, None] < half) & (cols[None, :] >= half)
        skip_next = (off > 0) & (rows[:, None] >= half) & (cols[None, :] < half)
        s = tl.where(skip_prev | skip_next, float("-inf"), s)
    return s


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fit_block})
@triton.jit
def window_fwd_kernel(
    Q, K, V, CNT, LO, HI,
    M_IN, L_IN, A_IN,  # optional initial softmax state (coarser levels), indexed at row >> 1
    O, M_OUT, L_OUT,  # normalised output + lse (FINAL) or the raw state m, l, acc (not FINAL)
    stride_b, stride_h, stride_m,  # q/k/v/o share one layout (B, H, M, D), D contiguous
    stride_cb,  # counts (B, M)
    stride_sb, stride_sh,  # row stats (B, H, M)
    in_stride_b, in_stride_h, in_stride_m,  # A_IN (B, H, M_in, D)
    in_sstride_b, in_sstride_h,  # M_IN / L_IN (B, H, M_in)
    H,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, HAS_INIT: tl.constexpr, FINAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = pid_m * BLOCK_M
    qblock = start // NR
    rows = start % NR + tl.arange(0, BLOCK_M)  # row index inside the block
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + qblock)
    hi = tl.load(HI + qblock)

    base = b * stride_b + h * stride_h
    q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])

    if HAS_INIT:
        init_rows = offs_m // 2
        m_i = tl.load(M_IN + b * in_sstride_b + h * in_sstride_h + init_rows)
        l_i = tl.load(L_IN + b * in_sstride_b + h * in_sstride_h + init_rows)
        acc = tl.load(A_IN + b * in_stride_b + h * in_stride_h + init_rows[:, None] * in_stride_m + offs_d[None, :])
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    for w in tl.static_range(NUM_WIN):
        off = FIRST + w * STEP
        kblock = qblock + off
        if (kblock >= lo) & (kblock < hi):
            for sub in tl.static_range(NR // BLOCK_N):
                cols = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_n = kblock * NR + cols
                k = tl.load(K + base + offs_n[:, None] * stride_m + offs_d[None, :])
                v = tl.load(V + base + offs_n[:, None] * stride_m + offs_d[None, :])
                cnt = tl.load(CNT + b * stride_cb + offs_n)
                s = _scores(q, k, cnt, rows, cols, off, LEVEL0, CAUSAL, NR)
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m_i = m_new

    stats = b * stride_sb + h * stride_sh + offs_m
    if FINAL:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + base + offs_m[:, None] * stride_m + offs_d[None, :], out.to(O.dtype.element_ty))
        tl.store(M_OUT + stats, tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf")))
    else:
        tl.store(O + base + offs_m[:, None] * stride_m + offs_d[None, :], acc)
        tl.store(M_OUT + stats, tl.where(m_i == float("-inf"), 0.0, m_i))
        tl.store(L_OUT + stats, l_i)


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fit_block})
@triton.jit
def window_bwd_dq_kernel(
    Q, K, V, CNT, LO, HI, DO, LSE, DELTA, DQ,
    stride_b, stride_h, stride_m,  # q/k/v (B, H, M, D)
    do_stride_b, do_stride_h, do_stride_m,  # dO and dQ (B, H, M, D)
    stride_cb, stride_sb, stride_sh,
    H,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = pid_m * BLOCK_M
    qblock = start // NR
    rows = start % NR + tl.arange(0, BLOCK_M)
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + qblock)
    hi = tl.load(HI + qblock)
    base = b * stride_b + h * stride_h
    do_base = b * do_stride_b + h * do_stride_h
    q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])
    do = tl.load(DO + do_base + offs_m[:, None] * do_stride_m + offs_d[None, :]).to(q.dtype)
    lse = tl.load(LSE + b * stride_sb + h * stride_sh + offs_m)
    lse = tl.where(lse == float("inf"), 0.0, lse)  # rows without keys: every p below is 0
    delta = tl.load(DELTA + b * stride_sb + h * stride_sh + offs_m)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for w in tl.static_range(NUM_WIN):
        off = FIRST + w * STEP
        kblock = qblock + off
        if (kblock >= lo) & (kblock < hi):
            for sub in tl.static_range(NR // BLOCK_N):
                cols = sub * BLOCK_N + tl.arange(0, BLOCK_N)
                offs_n = kblock * NR + cols
                k = tl.load(K + base + offs_n[:, None] * stride_m + offs_d[None, :])
                v = tl.load(V + base + offs_n[:, None] * stride_m + offs_d[None, :])
                cnt = tl.load(CNT + b * stride_cb + offs_n)
                s = _scores(q, k, cnt, rows, cols, off, LEVEL0, CAUSAL, NR)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + do_base + offs_m[:, None] * do_stride_m + offs_d[None, :], dq)


@triton.autotune(configs=_BWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _fit_block})
@triton.jit
def window_bwd_dkdv_kernel(
    Q, K, V, CNT, LO, HI, DO, LSE, DELTA, DK, DV,
    stride_b, stride_h, stride_m,
    do_stride_b, do_stride_h, do_stride_m,  # dO, dK and dV (B, H, M, D)
    stride_cb, stride_sb, stride_sh,
    H,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = pid_n * BLOCK_N
    kblock = start // NR
    cols = start % NR + tl.arange(0, BLOCK_N)
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + kblock)
    hi = tl.load(HI + kblock)
    base = b * stride_b + h * stride_h
    do_base = b * do_stride_b + h * do_stride_h
    k = tl.load(K + base + offs_n[:, None] * stride_m + offs_d[None, :])
    v = tl.load(V + base + offs_n[:, None] * stride_m + offs_d[None, :])
    cnt = tl.load(CNT + b * stride_cb + offs_n)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for w in tl.static_range(NUM_WIN):
        off = FIRST + w * STEP
        qblock = kblock - off  # the query block whose window holds this key block at `off`
        if (qblock >= lo) & (qblock < hi):
            for sub in tl.static_range(NR // BLOCK_M):
                rows = sub * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_m = qblock * NR + rows
                q = tl.load(Q + base + offs_m[:, None] * stride_m + offs_d[None, :])
                do = tl.load(DO + do_base + offs_m[:, None] * do_stride_m + offs_d[None, :]).to(q.dtype)
                lse = tl.load(LSE + b * stride_sb + h * stride_sh + offs_m)
                lse = tl.where(lse == float("inf"), 0.0, lse)
                delta = tl.load(DELTA + b * stride_sb + h * stride_sh + offs_m)
                s = _scores(q, k, cnt, rows, cols, off, LEVEL0, CAUSAL, NR)
                p = tl.exp2(s - lse[:, None])
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + do_base + offs_n[:, None] * do_stride_m + offs_d[None, :], dk)
    tl.store(DV + do_base + offs_n[:, None] * do_stride_m + offs_d[None, :], dv)
