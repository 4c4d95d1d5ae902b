"""Triton kernels of hierarchical attention.

Every level lives in one packed buffer per tensor, shape (B, H, MTOT, D): level 0 (the fine tokens,
padded to whole blocks) first, then levels 1, 2, ... each padded to whole blocks; ``START[l]`` and
``LEN[l]`` give a level's rows. Counts (B, MTOT) say how many real tokens a row stands for. The values
are the exception: their level 0 is the input v itself, read in place (no rotation or scale to apply),
and their packed buffer holds the coarse levels only (``_values``).

- ``coarsen_kernel`` fills the packed buffers from the raw q, k, v in one pass over the input:
  scaled, rotated and masked level 0 of q and k, then up to COARSEN_LV coarse levels by pairwise sums in registers (coarse
  queries and keys are means over real tokens, values means entering with weight ``count``;
  causal coarse queries are the group's first real query). Deeper hierarchies chain launches.
- ``window_fwd_kernel`` / ``window_bwd_dq_kernel`` / ``window_bwd_dkdv_kernel``: windowed block
  attention, one kernel family for all levels. Query block c attends to key blocks
  ``c + FIRST + w * STEP`` (w < NUM_WIN) inside its level's range ``[lo[c], hi[c])``; at level 0
  (blocks c - 1 .. c, or .. c + 1 non-causal, walked as one span) the causal diagonal block is
  triangular, at coarse levels the half-block correction of docs/design.md applies. Each key carries
  ``log2(count)``. The level-0 forward starts its online softmax from the coarse levels' states of its
  ancestors, so every query ends with one softmax over all levels.
- ``fold_kernel``: for the backward, folds each coarse group's rows: ``ref = min lse``,
  ``dObar = sum 2^(ref - lse_i) dO_i``, ``Dbar = sum 2^(ref - lse_i) Delta_i``, so the same
  backward kernels compute coarse gradients.
- The backward kernels run on the coarse levels first, then on level 0, whose epilogue adds each
  token's share of its ancestors' gradients (means: divided by the count; causal queries: to the
  sampled first token), turns dq and dk back through the rotary embedding and writes dq, dk, dv: no
  pass over the tokens of its own, and no level-0 gradient copy.

Scores are kept in base 2: level 0 holds q scaled by ``scale * log2(e)`` (so q.k is the base-2 score),
and the level-0 backward takes the log2(e) off dk again.
"""

import inspect
import os

import triton
import triton.language as tl

# Coarse levels one fold launch produces (chunks of 2**LV input rows), and its warps; the same for one
# coarsen launch. Fewer levels per launch means more launches, but far cheaper ones: deeper tiles spill
# registers (with rotary q and k above all) and take several times longer than the extra launches cost.
LV, FOLD_WARPS = 2, 1
COARSEN_LV, COARSEN_WARPS = 2, 1
# Tests: the tile shapes to force, each (BLOCK_M, BLOCK_N) or (BLOCK_M, BLOCK_N, num_warps, num_stages).
# A kernel whose configs hold one of them takes only that one (the first config matching it, so a pair
# that matches several configs tests one of them); the others keep their default.
FORCE_TILES: frozenset = frozenset()


def autotune_enabled() -> bool:
    return os.environ.get("H_TRANSFORMER_1D_AUTOTUNE", "1") != "0"


def tile_configs(shapes):
    """Tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages[, widest head dim]); one small one under the
    interpreter; only the first that fits (a good default) when H_TRANSFORMER_1D_AUTOTUNE=0 (no tuning delay)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        shapes = [(16, 16, 1, 1), (32, 32, 1, 1), (32, 16, 1, 1), (16, 32, 1, 1)]
    configs = []
    for m, n, w, s, *widest in shapes:
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        if widest:
            # kept beside the config, not on it: Triton's autotuning cache rebuilds configs from their attributes
            WIDEST_HEAD[id(config)] = (config, widest[0])
        configs.append(config)
    return configs


WIDEST_HEAD: dict = {}  # id(config) -> (config, the widest head dim it runs at); the config kept alive with its id


# Past head dim 128 the tuned tiles no longer fit: a (BLOCK_M, D) float32 accumulator over the warps'
# registers and the pipelined key and value tiles in shared memory grow with D. Tiles up to these
# (rows x D) keep both within an H100's budget at D = 256.
WIDE_HEAD_TILES = (64 * 256, 32 * 256)


def fits_head(config, d: int) -> bool:
    """Whether a tile runs at head dim d: within its own widest head (a tile that spills registers past it,
    compiled for sm_90a: benchmarks/results/kernel_resources) and, past 128, within WIDE_HEAD_TILES."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    widest = WIDEST_HEAD.get(id(config))
    if widest is not None and d > widest[1]:
        return False
    return d <= 128 or (block_m * d <= WIDE_HEAD_TILES[0] and block_n * d <= WIDE_HEAD_TILES[1])


def fit_block(configs, nargs, **kwargs):
    """Tiles must divide the block size NR (and fit the head dim D); keep the largest that fit."""
    nr = kwargs.get("NR", nargs.get("NR"))
    d = kwargs.get("D", nargs.get("D"))
    fitting = [
        c for c in configs if c.kwargs["BLOCK_M"] <= nr and c.kwargs["BLOCK_N"] <= nr and fits_head(c, d)
    ]
    forced = [c for c in configs if tile_shape(c)[:2] in FORCE_TILES or tile_shape(c) in FORCE_TILES]
    if forced:  # tests: a forced shape must fit, or the test is not testing it
        if not all(c in fitting for c in forced):
            raise ValueError(f"FORCE_TILES {sorted(FORCE_TILES)}: a forced tile is larger than the block ({nr})")
        return forced[:1]
    if os.environ.get("TRITON_INTERPRET") == "1":
        return fitting[:1]  # the smallest tile: several tiles per block, so tiling is exercised
    if not autotune_enabled():
        return fitting[:1]
    return fitting


def tile_shape(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


_KEY = ["NR", "D", "FIRST", "STEP", "NUM_WIN", "LEVEL0", "CAUSAL", "UNIFORM"]


def _autotune(configs):
    """triton.autotune over `configs`, keeping its choices on disk where this Triton can (3.4 and later:
    ``cache_results``, keyed by the GPU architecture, the Triton build, the kernel source and the tuning
    key), so that only the first process on a machine pays the benchmarking."""
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=_KEY, prune_configs_by={"early_config_prune": fit_block}, **extra)


CHOSEN_CONFIGS: dict = {}


def launch(kernel, grid, *args, **consts) -> None:
    """``kernel[grid](*args, **consts)`` for an autotuned kernel. The autotuner's first call for a
    tuning key picks the tile (benchmarking the candidates when tuning is on); later calls with that key
    launch the chosen tile directly, without the autotuner's per-call bookkeeping (host time that adds up
    over the dozens of window launches of a training step).
    The key holds everything the choice depends on: the kernel, the constexpr arguments (which include
    the autotuner's key), the inputs' dtype, the tiles tests force and whether tuning is on."""
    key = (kernel, args[0].dtype, FORCE_TILES, autotune_enabled(), *consts.items())
    config = CHOSEN_CONFIGS.get(key)
    if config is None:
        kernel[grid](*args, **consts)
        CHOSEN_CONFIGS[key] = kernel.best_config
        return
    kernel.fn.run(*args, grid=grid, warmup=False, **consts, **config.all_kwargs())


# Tile lists, each (BLOCK_M, BLOCK_N, num_warps, num_stages[, widest head dim]): the first that fits is the
# default; a widest head dim marks a tile that spills registers at wider heads (ptxas for sm_90a,
# benchmarks/results/kernel_resources), where autotuning would only time it to discard it.
FWD_TILES = [
    (128, 64, 4, 3, 64), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2, 64), (64, 32, 4, 3), (32, 32, 4, 2),
    (16, 16, 2, 2),
]  # fmt: skip
FWD_CONFIGS = tile_configs(FWD_TILES)
# The query-side backward keeps the scores and dq accumulator of its rows: 128 rows take 8 warps (over 4
# they spill at every head dim).
DQ_TILES = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 2),
            (16, 16, 2, 2)]  # fmt: skip
DQ_CONFIGS = tile_configs(DQ_TILES)
# The key-side backward keeps dk and dv of its BLOCK_N keys: 64 keys fit head dims up to 64; wider heads
# take 32. Its first (default) tile is the fastest when each tile is forced in turn at the training tool's
# shape (context 4,096, block 512; benchmarks/results/attention_gpu/).
BWD_TILES = [(32, 64, 4, 3, 64), (64, 64, 4, 2, 64), (64, 128, 8, 2, 64), (128, 64, 8, 2, 64), (64, 32, 4, 3),
             (32, 32, 4, 3), (16, 16, 2, 2)]  # fmt: skip
BWD_CONFIGS = tile_configs(BWD_TILES)
# each window kernel's tile list, by kernel name (studies and tests walk them)
WINDOW_TILES = {"window_fwd_kernel": FWD_TILES, "window_bwd_dq_kernel": DQ_TILES, "window_bwd_dkdv_kernel": BWD_TILES}


# --------------------------------------------------------------------------- pairwise reductions


@triton.jit
def _halves(x, R: tl.constexpr, D: tl.constexpr):
    """(R, D) -> the even rows and the odd rows, each (R // 2, D)."""
    return tl.split(tl.permute(tl.reshape(x, [R // 2, 2, D]), (0, 2, 1)))


@triton.jit
def _halves1(x, R: tl.constexpr):
    """(R,) -> the even and the odd entries, each (R // 2,)."""
    return tl.split(tl.reshape(x, [R // 2, 2]))


@triton.jit
def _rotary_tables(COS, SIN, pos, ok, R: tl.constexpr, D: tl.constexpr):
    """cos and sin (R, D // 2) of the rotary angles at positions `pos` (tables (N, D // 2))."""
    half = tl.arange(0, D // 2)
    ptr = pos[:, None] * (D // 2) + half[None, :]
    cos = tl.load(COS + ptr, mask=ok[:, None], other=1.0)
    sin = tl.load(SIN + ptr, mask=ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def _coarsen_tensor(
    x, cols, P, p_off, cnt, pid, START, LEN, BASE, TOP,
    STORE0: tl.constexpr, TAKE_FIRST: tl.constexpr, CH: tl.constexpr, LVL: tl.constexpr, D: tl.constexpr,
    DW: tl.constexpr,
):
    """One tensor's chunk x (CH input rows x DW columns `cols`, fp32) -> its level-0 copy (STORE0) and
    coarse levels BASE+1 .. BASE+LVL of the packed buffer P (rows of D)."""
    rows = pid * CH + tl.arange(0, CH)
    if STORE0:
        m0 = tl.load(LEN)
        tl.store(P + p_off + rows[:, None] * D + cols[None, :], x.to(P.dtype.element_ty), mask=(rows < m0)[:, None])
    acc = x if TAKE_FIRST else x * cnt[:, None]
    c = cnt
    for j in tl.static_range(1, LVL + 1):
        a, b = _halves(acc, CH >> (j - 1), DW)
        ca, cb = _halves1(c, CH >> (j - 1))
        if TAKE_FIRST:
            acc = tl.where(ca[:, None] > 0, a, b)
        else:
            acc = a + b
        c = ca + cb
        level = BASE + j
        start = tl.load(START + level)
        length = tl.load(LEN + level)
        local = pid * (CH >> j) + tl.arange(0, CH >> j)
        val = acc if TAKE_FIRST else acc / tl.maximum(c, 1.0)[:, None]
        ok = local < tl.where(level <= TOP, length, 0)
        tl.store(P + p_off + (start + local)[:, None] * D + cols[None, :], val.to(P.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _coarsen_input(
    X, x_off, sxm, rows, ok, cnt, mult, COS, SIN, P, p_off, pid, START, LEN, BASE, TOP,
    STORE0: tl.constexpr, TAKE_FIRST: tl.constexpr, ROTARY: tl.constexpr, CH: tl.constexpr, LVL: tl.constexpr,
    D: tl.constexpr,
):
    """Load CH input rows (zeros outside the input or without tokens), scale by `mult`, rotate the
    feature pairs (2i, 2i+1) when ROTARY (the two halves coarsen separately), and coarsen."""
    keep = cnt[:, None] > 0
    if ROTARY:  # even and odd features as two half-width tiles
        half = tl.arange(0, D // 2)
        base = X + x_off + rows[:, None] * sxm
        x1 = tl.load(base + 2 * half[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(base + 2 * half[None, :] + 1, mask=ok[:, None], other=0.0).to(tl.float32)
        cos, sin = _rotary_tables(COS, SIN, rows, ok, CH, D)
        r1 = tl.where(keep, (x1 * cos - x2 * sin) * mult, 0.0)
        r2 = tl.where(keep, (x1 * sin + x2 * cos) * mult, 0.0)
        _coarsen_tensor(r1, 2 * half, P, p_off, cnt, pid, START, LEN, BASE, TOP, STORE0, TAKE_FIRST, CH, LVL, D, D // 2)
        _coarsen_tensor(r2, 2 * half + 1, P, p_off, cnt, pid, START, LEN, BASE, TOP, STORE0, TAKE_FIRST, CH, LVL, D,
                        D // 2)
    else:
        offs_d = tl.arange(0, D)
        x = tl.load(X + x_off + rows[:, None] * sxm + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x = tl.where(keep, x * mult, 0.0)
        _coarsen_tensor(x, offs_d, P, p_off, cnt, pid, START, LEN, BASE, TOP, STORE0, TAKE_FIRST, CH, LVL, D, D)


@triton.jit
def coarsen_kernel(
    XQ, XK, XV, VALID, COS, SIN,  # raw (B, H|HKV, N, D) inputs of any strides (RAW) or the packed buffers; rotary
    PQ, PK, PV, PC, PF,  # packed outputs (B, H|HKV, MTOT, D), PV without level 0 (B, HKV, MTOT - M0, D); counts
    # (B, MTOT) f32; first token (B, MTOT) i32
    START, LEN,  # int32 per level (padded past the top with zeros)
    sqb, sqh, sqm, skb, skh, skm, svb, svh, svm,  # input strides (D contiguous)
    stride_valid,
    H, G, MTOT, N_IN, IN_ROW0, BASE, TOP, scale,
    D: tl.constexpr, LVL: tl.constexpr, RAW: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    ROTARY: tl.constexpr,
):
    """RAW: q (scaled, rotated when ROTARY), k (rotated) and the counts into level 0, and q, k, v into
    levels 1..LVL; otherwise levels BASE+1 .. BASE+LVL from the packed level BASE (ROTARY only with RAW).
    Level 0 of v is the input itself, which the window kernels read in place: PV starts at level 1.
    One program per query head; k and v have H / G heads (grouped-query attention): the first query
    head of each group of G coarsens its kv head, once."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    CH: tl.constexpr = 1 << LVL
    rows = pid * CH + tl.arange(0, CH)
    ok = rows < N_IN
    if RAW:
        if HAS_MASK:
            cnt = tl.load(VALID + b * stride_valid + rows, mask=ok, other=0).to(tl.float32)
        else:
            cnt = ok.to(tl.float32)
        first = rows
    else:
        cnt = tl.load(PC + b * MTOT + IN_ROW0 + rows, mask=ok, other=0.0)
        first = tl.load(PF + b * MTOT + IN_ROW0 + rows, mask=ok, other=0)
    p_off = (b * H + h) * MTOT * D
    in_rows = IN_ROW0 + rows
    _coarsen_input(XQ, b * sqb + h * sqh, sqm, in_rows, ok, cnt, scale, COS, SIN, PQ, p_off, pid, START, LEN, BASE,
                   TOP, RAW, CAUSAL, ROTARY, CH, LVL, D)
    if h % G == 0:
        hk = h // G
        kv_off = (b * (H // G) + hk) * MTOT * D
        _coarsen_input(XK, b * skb + hk * skh, skm, in_rows, ok, cnt, 1.0, COS, SIN, PK, kv_off, pid, START, LEN,
                       BASE, TOP, RAW, False, ROTARY, CH, LVL, D)
        pv, _ = _values(PV, 0, 0, 0, b, hk, H // G, MTOT, tl.load(LEN), False, D)  # its coarse levels
        if RAW:
            xv, xv_off, xv_m = XV, b * svb + hk * svh, svm
        else:
            xv, xv_off, xv_m = pv, 0, D
        _coarsen_input(xv, xv_off, xv_m, in_rows, ok, cnt, 1.0, COS, SIN, pv, 0, pid, START, LEN, BASE, TOP,
                       False, False, False, CH, LVL, D)
    if h == 0:  # counts and sampled positions are per batch row
        if RAW:
            m0 = tl.load(LEN)
            tl.store(PC + b * MTOT + rows, cnt, mask=rows < m0)
            tl.store(PF + b * MTOT + rows, first, mask=rows < m0)
        c = cnt
        f = first
        for j in tl.static_range(1, LVL + 1):
            ca, cb = _halves1(c, CH >> (j - 1))
            fa, fb = _halves1(f, CH >> (j - 1))
            f = tl.where(ca > 0, fa, fb)
            c = ca + cb
            level = BASE + j
            start = tl.load(START + level)
            local = pid * (CH >> j) + tl.arange(0, CH >> j)
            keep = local < tl.where(level <= TOP, tl.load(LEN + level), 0)
            tl.store(PC + b * MTOT + start + local, c, mask=keep)
            tl.store(PF + b * MTOT + start + local, f, mask=keep)


@triton.jit
def fold_kernel(
    DO, O, LSE,  # RAW: dO and O (B, H, N, D) any strides, lse (B, H, M0); else the packed buffers below
    PC, PDO, PLSE, PDEL,  # counts (B, MTOT); packed dO rows (B, H, MTOT, D); ref and Delta (B, H, MTOT)
    START, LEN,
    sdob, sdoh, sdom, sob, soh, som,
    H, MTOT, N_IN, IN_ROW0, BASE, TOP,
    D: tl.constexpr, LVL: tl.constexpr, RAW: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    CH: tl.constexpr = 1 << LVL
    rows = pid * CH + tl.arange(0, CH)
    offs_d = tl.arange(0, D)
    ok = rows < N_IN
    s_off = (b * H + h) * MTOT
    p_off = s_off * D
    if RAW:
        m0 = tl.load(LEN)
        cnt = tl.load(PC + b * MTOT + rows, mask=rows < m0, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = tl.where(cnt[:, None] > 0, do.to(tl.float32), 0.0)  # padded rows' outputs are constant zeros
        o = tl.load(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], mask=ok[:, None], other=0.0)
        delta = tl.sum(do * o.to(tl.float32), 1)
        lse = tl.load(LSE + (b * H + h) * m0 + rows, mask=rows < m0, other=float("inf"))
        keep0 = rows < m0
        tl.store(PDO + p_off + rows[:, None] * D + offs_d[None, :], do.to(PDO.dtype.element_ty), mask=keep0[:, None])
        tl.store(PLSE + s_off + rows, lse, mask=keep0)
        tl.store(PDEL + s_off + rows, delta, mask=keep0)
        ref = tl.where(cnt > 0, lse, float("inf"))  # padded rows take no part
    else:
        do = tl.load(PDO + p_off + (IN_ROW0 + rows)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        do = do.to(tl.float32)
        ref = tl.load(PLSE + s_off + IN_ROW0 + rows, mask=ok, other=float("inf"))
        delta = tl.load(PDEL + s_off + IN_ROW0 + rows, mask=ok, other=0.0)
    for j in tl.static_range(1, LVL + 1):
        ra, rb = _halves1(ref, CH >> (j - 1))
        new = tl.minimum(ra, rb)
        safe = tl.where(new == float("inf"), 0.0, new)
        wa = tl.exp2(safe - ra)  # <= 1; 0 for a side without rows (ref = +inf)
        wb = tl.exp2(safe - rb)
        da, db = _halves(do, CH >> (j - 1), D)
        do = da * wa[:, None] + db * wb[:, None]
        ea, eb = _halves1(delta, CH >> (j - 1))
        delta = ea * wa + eb * wb
        ref = new
        level = BASE + j
        start = tl.load(START + level)
        local = pid * (CH >> j) + tl.arange(0, CH >> j)
        keep = local < tl.where(level <= TOP, tl.load(LEN + level), 0)
        tl.store(PDO + p_off + (start + local)[:, None] * D + offs_d[None, :], do.to(PDO.dtype.element_ty),
                 mask=keep[:, None])
        tl.store(PLSE + s_off + start + local, ref, mask=keep)
        tl.store(PDEL + s_off + start + local, delta, mask=keep)


@triton.jit
def _add_ancestors(g, P, p_off, CNT, PF, START, rows, ok, cbase, M0, TOP, TAKE_FIRST: tl.constexpr, D: tl.constexpr):
    """The level-0 gradient tile g (R, D) of packed rows `rows` plus, per coarse level, the gradient of
    each row's ancestor (P: the coarse rows, packed row M0 first, from p_off) divided by the ancestor's
    count (a mean's gradient spreads evenly); TAKE_FIRST (causal queries, which sample their group's
    first token): all of it where the row is that token, nothing elsewhere."""
    offs_d = tl.arange(0, D)
    for level in range(1, TOP + 1):
        anc = tl.load(START + level) + (rows >> level)
        ga = tl.load(P + p_off + (anc - M0)[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
        if TAKE_FIRST:
            first = tl.load(PF + cbase + anc, mask=ok, other=-1)
            g += tl.where((first == rows)[:, None], ga.to(tl.float32), 0.0)
        else:
            inv = 1.0 / tl.maximum(tl.load(CNT + cbase + anc, mask=ok, other=1.0), 1.0)
            g += ga.to(tl.float32) * inv[:, None]
    return g


@triton.jit
def _unrotate(g, COS, SIN, rows, ok, R: tl.constexpr, D: tl.constexpr):
    """The gradient (R, D) of rotated rows turned back to the unrotated inputs: each feature pair
    (g1, g2) -> (g1 cos + g2 sin, g2 cos - g1 sin)."""
    cos, sin = _rotary_tables(COS, SIN, rows, ok, R, D)
    g1, g2 = tl.split(tl.reshape(g, [R, D // 2, 2]))
    return tl.reshape(tl.join(g1 * cos + g2 * sin, g2 * cos - g1 * sin), [R, D])


# --------------------------------------------------------------------------- windowed attention
#
# Each program walks contiguous spans of the other side's rows in runtime loops (``tl.range``, which
# Triton software-pipelines), skipping tiles that a mask would empty: the part of the causal diagonal
# block past the tile's last query, and the half-blocks the coarse correction removes. At level 0 the
# causal mask runs only on the span that meets the diagonal.


@triton.jit
def _mask_scores(s, cnt, r2, c2, off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr, NR: tl.constexpr,
                 UNIFORM: tl.constexpr, STRADDLE: tl.constexpr):
    """Masks of a tile of base-2 scores whose query rows `r2` and key columns `c2` are broadcast to its
    shape (either orientation: (BLOCK_M, 1) and (1, BLOCK_N), or their transposes); `cnt` likewise
    broadcast along the keys. Level 0 with DIAG: keys up to the query; coarse levels with STRADDLE (a
    tile wider than half a block): the half-block correction of window offset `off` (the previous
    block: queries in the first half skip the second half of its keys; the next block: queries in the
    second half skip the first half)."""
    if not UNIFORM:
        s = s + tl.where(cnt > 0, tl.log2(tl.maximum(cnt, 1e-30)), float("-inf"))
    if LEVEL0:
        if DIAG:
            s = tl.where(c2 <= r2, s, float("-inf"))
    elif STRADDLE:
        half = NR // 2
        r = r2 % NR
        c = c2 % NR
        if off < 0:
            s = tl.where((r < half) & (c >= half), float("-inf"), s)
        else:
            s = tl.where((r >= half) & (c < half), float("-inf"), s)
    return s


@triton.jit
def _scores(q, k, cnt, rows, cols, off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr, NR: tl.constexpr,
            UNIFORM: tl.constexpr):
    """Base-2 scores (BLOCK_M, BLOCK_N) of a (BLOCK_M, D) query tile against a (BLOCK_N, D) key tile at
    packed rows `rows` and `cols`, masks applied (`_mask_scores`).

    q carries log2(e), so q.k is the base-2 score. Each key adds log2 of its count, except with UNIFORM
    (every row of the level stands for the same number of tokens): the callers then add that constant
    to the softmax state or take it off the log-sum-exp. Tiles no wider than half a block never straddle
    a half-block (the spans skip whole halves), so they need no correction mask."""
    s = tl.dot(q, tl.trans(k))
    straddle: tl.constexpr = q.shape[0] > NR // 2 or k.shape[0] > NR // 2
    c = cnt if UNIFORM else cnt[None, :]
    return _mask_scores(s, c, rows[:, None], cols[None, :], off, LEVEL0, DIAG, NR, UNIFORM, straddle)


@triton.jit
def _scores_t(k, q, cnt, rows, cols, off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr,
              NR: tl.constexpr, UNIFORM: tl.constexpr):
    """The transpose of `_scores`: (BLOCK_N, BLOCK_M), keys along the rows. The key-side backward
    works in this orientation so that its probabilities and score gradients are the left operands of
    its dots as computed (no transpose of a register tile)."""
    s = tl.dot(k, tl.trans(q))
    straddle: tl.constexpr = q.shape[0] > NR // 2 or k.shape[0] > NR // 2
    c = cnt if UNIFORM else cnt[:, None]
    return _mask_scores(s, c, rows[None, :], cols[:, None], off, LEVEL0, DIAG, NR, UNIFORM, straddle)


@triton.jit
def _level0_keys(start, qblock, lo, hi, CAUSAL: tl.constexpr, NR: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Level 0: the key rows of query tile `start`, one contiguous span (the previous block clipped to
    the level, this one, and without CAUSAL the next), split at `diag`: [n_lo, diag) needs no mask,
    [diag, n_hi) (causal: the keys along the tile's queries, in whole key tiles) needs the causal one."""
    n_lo = tl.maximum(qblock - 1, lo) * NR
    if CAUSAL:
        diag = start // BLOCK_N * BLOCK_N
        n_hi = (start + BLOCK_M + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        diag = tl.minimum(qblock + 2, hi) * NR
        n_hi = diag
    return n_lo, diag, n_hi


@triton.jit
def _load_scores(q, K, VP, svm, N, CNT, base, cbase, rows, n0, off: tl.constexpr, LEVEL0: tl.constexpr,
                 DIAG: tl.constexpr, NR: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 UNIFORM: tl.constexpr):
    """The key tile at packed row n0: k, v and the masked base-2 scores of the query tile against it."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + base + cols[:, None] * D + offs_d[None, :])
    cnt = 1.0 if UNIFORM else tl.load(CNT + cbase + cols)
    v = _load_values(VP, svm, N, cols, cnt, LEVEL0, UNIFORM, D)
    return k, v, _scores(q, k, cnt, rows, cols, off, LEVEL0, DIAG, NR, UNIFORM)


@triton.jit
def _load_values(VP, svm, N, cols, cnt, LEVEL0: tl.constexpr, UNIFORM: tl.constexpr, D: tl.constexpr):
    """Value rows `cols` (packed row numbers) through VP (`_values`): at level 0 the input itself, whose
    rows stop at N, and read as zeros where the key is padding (count 0): a padded position's weight is
    0, and its value may be anything, NaN included."""
    offs_d = tl.arange(0, D)
    ptr = VP + cols[:, None] * svm + offs_d[None, :]
    if LEVEL0:
        ok = cols < N
        if not UNIFORM:
            ok = ok & (cnt > 0)
        v = tl.load(ptr, mask=ok[:, None], other=0.0)
    else:
        v = tl.load(ptr)
    return v


@triton.jit
def _values(V, vsb, vsh, vsm, b, hk, HKV, MTOT, M0, LEVEL0: tl.constexpr, D: tl.constexpr):
    """(pointer, row stride) through which packed row r of kv head hk's values is VP + r * stride: at
    level 0 the input v (B, HKV, N, D) of any strides, read in place; above it the coarse values
    (B, HKV, MTOT - M0, D), whose first row is packed row M0."""
    if LEVEL0:
        vp = V + b * vsb + hk * vsh
        stride = vsm
    else:
        vp = V + (b * HKV + hk) * (MTOT - M0) * D - M0 * D
        stride = D
    return vp, stride


@triton.jit
def _block_span(block, lo_in, hi_in, lo, hi, NR: tl.constexpr, TILE: tl.constexpr):
    """Packed rows [lo_in, hi_in) of `block`, widened to whole tiles; empty unless lo <= block < hi."""
    first = block * NR + lo_in // TILE * TILE
    last = tl.where((block >= lo) & (block < hi), block * NR + (hi_in + TILE - 1) // TILE * TILE, first)
    return first, last


@triton.jit
def _level_shift(CNT, row, LEVEL0: tl.constexpr, UNIFORM: tl.constexpr):
    """With UNIFORM, log2 of the count every row of `row`'s level stands for (the scores leave it out);
    0 otherwise."""
    shift = 0.0
    if UNIFORM and not LEVEL0:
        shift = tl.log2(tl.load(CNT + row))
    return shift


@triton.jit
def _key_span(start, qblock, lo, hi, off: tl.constexpr, NR: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Coarse levels: the packed key rows [n_lo, n_hi) that query tile `start` meets in the block at
    window offset `off` (empty outside the level), in whole key tiles."""
    kb = qblock + off
    r0 = start % NR
    if off < 0:
        c_lo = 0
        c_hi = tl.where(r0 + BLOCK_M <= NR // 2, NR // 2, NR)
    else:
        c_lo = tl.where(r0 >= NR // 2, NR // 2, 0)
        c_hi = NR
    return _block_span(kb, c_lo, c_hi, lo, hi, NR, BLOCK_N)


@triton.jit
def _query_span(start, kblock, lo, hi, off: tl.constexpr, NR: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Coarse levels: the packed query rows [m_lo, m_hi) of the block whose window holds key tile
    `start` at offset `off` and that meet it (empty outside the level), in whole query tiles."""
    qb = kblock - off
    c0 = start % NR
    if off < 0:  # the next block's queries: those in its first half see only our first half
        r_lo = tl.where(c0 >= NR // 2, NR // 2, 0)
        r_hi = NR
    else:  # the previous block's queries: those in its second half see only our second half
        r_lo = 0
        r_hi = tl.where(c0 + BLOCK_N <= NR // 2, NR // 2, NR)
    return _block_span(qb, r_lo, r_hi, lo, hi, NR, BLOCK_M)


@triton.jit
def _fwd_span(acc, l_i, m_i, q, K, VP, svm, N, CNT, base, cbase, rows, n_lo, n_hi,
              off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr, NR: tl.constexpr, D: tl.constexpr,
              BLOCK_N: tl.constexpr, UNIFORM: tl.constexpr):
    """Online softmax of the query tile over the key rows [n_lo, n_hi)."""
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        _k, v, s = _load_scores(q, K, VP, svm, N, CNT, base, cbase, rows, n0, off, LEVEL0, DIAG, NR, D, BLOCK_N,
                                UNIFORM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(FWD_CONFIGS)
@triton.jit
def window_fwd_kernel(
    Q, K, V, CNT, LO, HI, START,  # packed q (B, H, MTOT, D), k (B, H / G, MTOT, D); v: `_values`; counts
    # (B, MTOT); per-block ranges; level starts
    SM, SL, SA,  # coarse softmax states (B, H, MTOT - M0[, D]): written (not FINAL) or read (FINAL)
    O, LSE,  # FINAL: output (B, H, N, D) any strides, base-2 log-sum-exp (B, H, M0)
    sob, soh, som, vsb, vsh, vsm,  # O's strides; the input v's (level 0)
    H, G, MTOT, M0, N, ROW0, TOP,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, FINAL: tl.constexpr, UNIFORM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = ROW0 + pid_m * BLOCK_M
    qblock = start // NR
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + qblock)
    hi = tl.load(HI + qblock)

    base = (b * H + h) * MTOT * D
    kv_base = (b * (H // G) + h // G) * MTOT * D  # grouped-query attention: the kv head of query head h
    VP, svm = _values(V, vsb, vsh, vsm, b, h // G, H // G, MTOT, M0, LEVEL0, D)
    cbase = b * MTOT
    sbase = (b * H + h) * (MTOT - M0)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if FINAL:  # start from the coarse levels' states of each query's ancestors
        for level in range(1, TOP + 1):
            anc = tl.load(START + level) + (offs_m >> level) - M0
            m_a = tl.load(SM + sbase + anc)
            l_a = tl.load(SL + sbase + anc)
            a_a = tl.load(SA + sbase * D + anc[:, None] * D + offs_d[None, :])
            m_new = tl.maximum(m_i, m_a)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            beta = tl.exp2(m_a - m_safe)
            l_i = l_i * alpha + l_a * beta
            acc = acc * alpha[:, None] + a_a * beta[:, None]
            m_i = m_new

    if LEVEL0:
        n_lo, diag, n_hi = _level0_keys(start, qblock, lo, hi, CAUSAL, NR, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, K, VP, svm, N, CNT, kv_base, cbase, offs_m, n_lo, diag,
                                  0, True, False, NR, D, BLOCK_N, UNIFORM)
        if CAUSAL:
            acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, K, VP, svm, N, CNT, kv_base, cbase, offs_m, diag, n_hi,
                                      0, True, True, NR, D, BLOCK_N, UNIFORM)
    else:
        for w in tl.static_range(NUM_WIN):
            n_lo, n_hi = _key_span(start, qblock, lo, hi, FIRST + w * STEP, NR, BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, K, VP, svm, N, CNT, kv_base, cbase, offs_m, n_lo, n_hi,
                                      FIRST + w * STEP, False, False, NR, D, BLOCK_N, UNIFORM)

    if FINAL:
        valid = tl.load(CNT + cbase + offs_m) > 0
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out = tl.where(valid[:, None], out, 0.0)  # padded positions output zeros
        optr = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
        tl.store(optr, out.to(O.dtype.element_ty), mask=(offs_m < N)[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(LSE + (b * H + h) * M0 + offs_m, lse)
    else:
        srow = sbase + offs_m - M0
        tl.store(SA + srow[:, None] * D + offs_d[None, :], acc)
        tl.store(SM + srow, m_i + _level_shift(CNT, cbase + start, LEVEL0, UNIFORM))
        tl.store(SL + srow, l_i)


@triton.jit
def _dq_span(dq, q, do, lse, delta, K, VP, svm, N, CNT, base, cbase, rows, n_lo, n_hi,
             off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr, NR: tl.constexpr, D: tl.constexpr,
             BLOCK_N: tl.constexpr, UNIFORM: tl.constexpr):
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        k, v, s = _load_scores(q, K, VP, svm, N, CNT, base, cbase, rows, n0, off, LEVEL0, DIAG, NR, D, BLOCK_N,
                               UNIFORM)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@_autotune(DQ_CONFIGS)
@triton.jit
def window_bwd_dq_kernel(
    Q, K, V, CNT, LO, HI, DO, LSE, DELTA,  # all packed: (B, H, MTOT[, D]), k (B, H / G, MTOT, D); v: `_values`
    PF, START, COS, SIN,  # first tokens (B, MTOT), level starts, rotary tables: the level-0 epilogue's
    DQ, PDQ,  # the output (see below); the coarse rows' gradients (B, H, MTOT - M0, D), read at level 0
    sdb, sdh, sdm, vsb, vsh, vsm,  # DQ's strides; the input v's
    H, G, MTOT, M0, N, ROW0, TOP, scale,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, UNIFORM: tl.constexpr, ROTARY: tl.constexpr,
):
    """Coarse levels: the gradients of the coarse query rows, into DQ = the coarse rows' buffer. Level 0
    (launched after them): each query's whole gradient, its ancestors' shares added (`_add_ancestors`),
    turned back through the rotary embedding, scaled, into DQ = dq (B, H, N, D)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = ROW0 + pid_m * BLOCK_M
    qblock = start // NR
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + qblock)
    hi = tl.load(HI + qblock)
    base = (b * H + h) * MTOT * D
    kv_base = (b * (H // G) + h // G) * MTOT * D
    VP, svm = _values(V, vsb, vsh, vsm, b, h // G, H // G, MTOT, M0, LEVEL0, D)
    cbase = b * MTOT
    sbase = (b * H + h) * MTOT
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :]).to(q.dtype)
    lse = tl.load(LSE + sbase + offs_m)
    lse = tl.where(lse == float("inf"), 0.0, lse)  # rows without keys: every p below is 0
    lse -= _level_shift(CNT, cbase + start, LEVEL0, UNIFORM)
    delta = tl.load(DELTA + sbase + offs_m)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if LEVEL0:
        n_lo, diag, n_hi = _level0_keys(start, qblock, lo, hi, CAUSAL, NR, BLOCK_M, BLOCK_N)
        dq = _dq_span(dq, q, do, lse, delta, K, VP, svm, N, CNT, kv_base, cbase, offs_m, n_lo, diag, 0, True, False,
                      NR, D, BLOCK_N, UNIFORM)
        if CAUSAL:
            dq = _dq_span(dq, q, do, lse, delta, K, VP, svm, N, CNT, kv_base, cbase, offs_m, diag, n_hi, 0, True,
                          True, NR, D, BLOCK_N, UNIFORM)
    else:
        for w in tl.static_range(NUM_WIN):
            n_lo, n_hi = _key_span(start, qblock, lo, hi, FIRST + w * STEP, NR, BLOCK_M, BLOCK_N)
            dq = _dq_span(dq, q, do, lse, delta, K, VP, svm, N, CNT, kv_base, cbase, offs_m, n_lo, n_hi,
                          FIRST + w * STEP, False, False, NR, D, BLOCK_N, UNIFORM)
    optr = DQ + b * sdb + h * sdh + (offs_m - ROW0)[:, None] * sdm + offs_d[None, :]
    if LEVEL0:
        ok = offs_m < N
        dq = _add_ancestors(dq, PDQ, (b * H + h) * (MTOT - M0) * D, CNT, PF, START, offs_m, ok, cbase, M0, TOP,
                            CAUSAL, D)
        if ROTARY:
            dq = _unrotate(dq, COS, SIN, offs_m, ok, BLOCK_M, D)
        valid = tl.load(CNT + cbase + offs_m) > 0
        dq = tl.where(valid[:, None], dq * scale, 0.0)  # packed q carries the scale: so does its gradient
        tl.store(optr, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    else:
        tl.store(optr, dq.to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_span(dk, dv, k, v, cnt, shift, Q, DO, LSE, DELTA, base, sbase, cols, m_lo, m_hi,
               off: tl.constexpr, LEVEL0: tl.constexpr, DIAG: tl.constexpr, NR: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, UNIFORM: tl.constexpr):
    offs_d = tl.arange(0, D)
    for m0 in tl.range(m_lo, m_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        q = tl.load(Q + base + rows[:, None] * D + offs_d[None, :])
        do = tl.load(DO + base + rows[:, None] * D + offs_d[None, :]).to(q.dtype)
        lse = tl.load(LSE + sbase + rows)
        lse = tl.where(lse == float("inf"), 0.0, lse) - shift
        delta = tl.load(DELTA + sbase + rows)
        st = _scores_t(k, q, cnt, rows, cols, off, LEVEL0, DIAG, NR, UNIFORM)  # (BLOCK_N, BLOCK_M)
        pt = tl.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@_autotune(BWD_CONFIGS)
@triton.jit
def window_bwd_dkdv_kernel(
    Q, K, V, CNT, LO, HI, DO, LSE, DELTA, PF, START, COS, SIN,  # as the dq kernel's
    DK, DV, PDK, PDV,  # outputs, and the coarse rows' gradients (B, H / G, MTOT - M0, D), as DQ and PDQ there
    skb, skh, skm, svb, svh, svm, vsb, vsh, vsm,  # DK's and DV's strides; the input v's
    H, G, MTOT, M0, N, ROW0, TOP,
    NR: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FIRST: tl.constexpr, STEP: tl.constexpr, NUM_WIN: tl.constexpr,
    LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, UNIFORM: tl.constexpr, ROTARY: tl.constexpr,
):
    """One program per key tile of a kv head. With grouped-query attention (k, v with H / G heads) it
    walks the queries of the G query heads that share the kv head in turn, so dk and dv come out summed
    over the group in registers: no per-query-head copy of them, no atomics. Coarse levels write the
    coarse rows' gradients; level 0 (after them) each token's whole dk and dv, as the dq kernel does."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)  # (batch row, kv head)
    start = ROW0 + pid_n * BLOCK_N
    kblock = start // NR
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    lo = tl.load(LO + kblock)
    hi = tl.load(HI + kblock)
    b = bh // (H // G)
    hk = bh % (H // G)
    kv_base = bh * MTOT * D
    k = tl.load(K + kv_base + offs_n[:, None] * D + offs_d[None, :])
    cnt = 1.0 if UNIFORM else tl.load(CNT + b * MTOT + offs_n)
    VP, v_stride = _values(V, vsb, vsh, vsm, b, hk, H // G, MTOT, M0, LEVEL0, D)
    v = _load_values(VP, v_stride, N, offs_n, cnt, LEVEL0, UNIFORM, D)
    shift = _level_shift(CNT, b * MTOT + start, LEVEL0, UNIFORM)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for member in range(G):
        qh = b * H + bh % (H // G) * G + member  # the query heads of kv head bh % (H / G)
        base = qh * MTOT * D
        sbase = qh * MTOT
        if LEVEL0:  # the queries whose windows hold this key tile: this block (and the next, the previous)
            m_hi = tl.minimum(kblock + 2, hi) * NR
            if CAUSAL:  # queries along the diagonal (masked), then the later ones (no mask)
                diag_lo = start // BLOCK_M * BLOCK_M
                diag_hi = (start + BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
                dk, dv = _dkdv_span(dk, dv, k, v, cnt, shift, Q, DO, LSE, DELTA, base, sbase, offs_n, diag_lo,
                                    diag_hi, 0, True, True, NR, D, BLOCK_M, UNIFORM)
                dk, dv = _dkdv_span(dk, dv, k, v, cnt, shift, Q, DO, LSE, DELTA, base, sbase, offs_n, diag_hi, m_hi,
                                    0, True, False, NR, D, BLOCK_M, UNIFORM)
            else:
                dk, dv = _dkdv_span(dk, dv, k, v, cnt, shift, Q, DO, LSE, DELTA, base, sbase, offs_n,
                                    tl.maximum(kblock - 1, lo) * NR, m_hi, 0, True, False, NR, D, BLOCK_M, UNIFORM)
        else:
            for w in tl.static_range(NUM_WIN):
                m_lo, m_hi = _query_span(start, kblock, lo, hi, FIRST + w * STEP, NR, BLOCK_M, BLOCK_N)
                dk, dv = _dkdv_span(dk, dv, k, v, cnt, shift, Q, DO, LSE, DELTA, base, sbase, offs_n, m_lo, m_hi,
                                    FIRST + w * STEP, False, False, NR, D, BLOCK_M, UNIFORM)
    out_rows = (offs_n - ROW0)[:, None]
    kptr = DK + b * skb + hk * skh + out_rows * skm + offs_d[None, :]
    vptr = DV + b * svb + hk * svh + out_rows * svm + offs_d[None, :]
    if LEVEL0:
        ok = offs_n < N
        c_off = bh * (MTOT - M0) * D
        cbase = b * MTOT
        dk = _add_ancestors(dk, PDK, c_off, CNT, PF, START, offs_n, ok, cbase, M0, TOP, False, D)
        dv = _add_ancestors(dv, PDV, c_off, CNT, PF, START, offs_n, ok, cbase, M0, TOP, False, D)
        if ROTARY:
            dk = _unrotate(dk, COS, SIN, offs_n, ok, BLOCK_N, D)
        valid = (tl.load(CNT + cbase + offs_n) > 0)[:, None]
        dk = tl.where(valid, dk * 0.6931471805599453, 0.0)  # packed q carries log2(e): d/dk of q.k / log2(e)
        dv = tl.where(valid, dv, 0.0)
        tl.store(kptr, dk.to(DK.dtype.element_ty), mask=ok[:, None])
        tl.store(vptr, dv.to(DV.dtype.element_ty), mask=ok[:, None])
    else:
        tl.store(kptr, dk.to(DK.dtype.element_ty))
        tl.store(vptr, dv.to(DV.dtype.element_ty))
