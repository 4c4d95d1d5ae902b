"""Hierarchical attention through the Triton kernels: launch logic and the autograd custom ops.

Forward (3 launches for 2 * block_size < N <= 8 * block_size, 2 below, one more per further 2 levels):
  1. ``coarsen_kernel`` reads q, k, v once and writes level 0 and two coarse levels into packed
     buffers; each further launch derives two more levels from the last;
  2. one windowed launch over all coarse levels gives an unnormalised softmax state per coarse query;
  3. the level-0 launch starts each query's online softmax from its ancestors' coarse states, so
     every query ends with one softmax over all levels, and stores one log-sum-exp.
Backward (5 launches for 2 * block_size < N <= 8 * block_size, 3 below, one more per further 2
levels): ``fold_kernel`` folds each coarse group's
rows (``dObar = sum_i 2^(ref - lse_i) dO_i``, ``Dbar`` likewise, ``ref = min_i lse_i``: every coarse
weight of the group is <= 2^-ref, so nothing overflows); the windowed backward kernels run on the
packed coarse levels, then on level 0, where each token adds its share of its ancestors' gradients
(means: divided by the count; causal queries: to the sampled first token) before dq, dk and dv are
written.
"""

import contextlib
import functools
import math
import os

import torch

from .geometry import effective_block_size, level_lengths, num_levels, window_offsets

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# The kernels' tiles span the head dim: these widths run as they are; any other head dim up to 256 is zero-padded to
# the next of them (zeros add nothing to a score, and the output's extra columns are dropped).
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = KERNEL_HEAD_DIMS[-1]
MIN_BLOCK, MAX_BLOCK = 16, 512
LOG2E = 1.4426950408889634  # the kernels keep scores in base 2: level-0 queries carry it
# True: eager calls go through the custom ops too, as torch.compile does (tests compare both paths)
VIA_CUSTOM_OPS = False


def uniform_levels(n: int, nr: int, has_mask: bool) -> bool:
    """Whether every row of every level stands for exactly 2**level real tokens (no mask, and N a
    multiple of the top level's block): the kernels then skip the per-key log-count."""
    return not has_mask and n % (nr << num_levels(n, nr)) == 0


def supports(q: torch.Tensor, block_size: int, allow_float32: bool = False) -> bool:
    """Whether the kernels handle these inputs (float32 only on request: it runs through TF32)."""
    return (
        (q.dtype in SUPPORTED_DTYPES or (allow_float32 and q.dtype == torch.float32))
        and q.shape[-1] <= MAX_HEAD_DIM
        and MIN_BLOCK <= block_size <= MAX_BLOCK
    )


def kernel_head_dim(d: int) -> int:
    """The width the kernels run a head dim `d` (<= MAX_HEAD_DIM) at: the narrowest of KERNEL_HEAD_DIMS >= d."""
    return next(w for w in KERNEL_HEAD_DIMS if w >= d)


def triton_usable(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on `t`: a CUDA tensor, or a CPU one under TRITON_INTERPRET=1 (tests),
    with triton installed."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def launch_device(t: torch.Tensor):
    """A context with `t`'s CUDA device current: Triton launches on the current device, so a model on
    cuda:1 while cuda:0 is current would hand it pointers of another device."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _on_device_of_first_argument(fn):
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        with launch_device(first):
            return fn(first, *args, **kwargs)

    return run


def alloc(*shape, device, dtype) -> torch.Tensor:
    """Every kernel output comes from here, so that tests can poison it with NaN (an element a kernel
    forgets to write then shows up)."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _carve(flat: torch.Tensor, *shapes) -> list[torch.Tensor]:
    """Contiguous tensors of `shapes`, one after the other in the 1-D `flat` (one allocation, not one
    per tensor: each costs host time on every call)."""
    views, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[start : start + size].view(shape))
        start += size
    return views


def _alloc_bnhd(b, h, n, d, device, dtype) -> torch.Tensor:
    """A (B, H, N, D) tensor stored as (B, N, H, D): merging heads afterwards is a free view."""
    return alloc(b, n, h, d, device=device, dtype=dtype).transpose(1, 2)


def window_constants(level0: bool, causal: bool) -> tuple[int, int, int]:
    """(FIRST, STEP, NUM_WIN): the key blocks c + FIRST + w * STEP of query block c, `window_offsets` as
    the kernels walk them (at level 0 they are contiguous and the kernels take the span directly)."""
    offsets = window_offsets(causal, 0 if level0 else 1)
    return offsets[0], 1 if level0 else 2, len(offsets)  # coarse windows skip the query's own block


class Layout:
    """Where each level lives in the packed buffers (host-side numbers; the device tables that the
    kernels read come from `layout_tables`)."""

    def __init__(self, n: int, nr: int):
        self.lengths = level_lengths(n, nr)  # rows of each level in the packed buffers
        self.top = len(self.lengths) - 1
        self.starts = [0]
        for length in self.lengths[:-1]:
            self.starts.append(self.starts[-1] + length)
        self.m0 = self.lengths[0]
        self.mtot = self.starts[-1] + self.lengths[-1]
        self.blocks = self.mtot // nr

    def chunk_grid(self, base: int, lvl: int) -> int:
        """Chunks of 2**lvl rows of level `base` needed to fill levels base+1 .. base+lvl."""
        rows = self.lengths[base] if base == 0 else 0
        for j in range(1, lvl + 1):
            if base + j <= self.top:
                rows = max(rows, self.lengths[base + j] << j)
        return -(-rows // (1 << lvl))

    def split(self, tables: torch.Tensor):
        """The four tables in `layout_tables`' order: lo and hi (per packed block: the block range of
        its level), and the start and length of each level (padded)."""
        nb, nl = self.blocks, (tables.numel() - 2 * self.blocks) // 2
        return tables[:nb], tables[nb : 2 * nb], tables[2 * nb : 2 * nb + nl], tables[2 * nb + nl :]


_LAYOUTS: dict = {}


def packed_layout(n: int, nr: int) -> Layout:
    layout = _LAYOUTS.get((n, nr))
    if layout is None:
        if len(_LAYOUTS) >= 256:  # many distinct lengths (variable-length batches): start over
            _LAYOUTS.clear()
        layout = _LAYOUTS[(n, nr)] = Layout(n, nr)
    return layout


def build_layout_tables(n: int, nr: int, device) -> torch.Tensor:
    """One int32 tensor: lo and hi per packed block, then the start and length of each level, padded
    with zeros for the levels that the coarsen and fold launches read past the top (masked off).

    Only device ops (no host-to-device copy), so that torch.compile can trace it and CUDA graphs can
    capture it."""
    from .triton_kernels import COARSEN_LV, LV

    lengths = level_lengths(n, nr)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pad = max(LV, COARSEN_LV) + 1

    def run(value: int, count: int) -> torch.Tensor:
        return torch.full((count,), value, dtype=torch.int32, device=device)

    parts = [run(s // nr, ln // nr) for s, ln in zip(starts, lengths)]
    parts += [run((s + ln) // nr, ln // nr) for s, ln in zip(starts, lengths)]
    parts += [run(s, 1) for s in starts] + [run(0, pad)]
    parts += [run(ln, 1) for ln in lengths] + [run(0, pad)]
    return torch.cat(parts)


LAYOUT_TABLES: dict = {}


def layout_tables(n: int, nr: int, device) -> torch.Tensor:
    """Cached per shape in eager calls (building them costs launches); built in the traced graph under
    torch.compile, so that no cached tensor lives in a CUDA graph's memory pool."""
    if torch.compiler.is_compiling():
        return build_layout_tables(n, nr, device)
    from .triton_kernels import COARSEN_LV, LV

    key = (n, nr, str(device), LV, COARSEN_LV)  # the padding follows the launches' level counts
    tables = LAYOUT_TABLES.get(key)
    if tables is None:
        if len(LAYOUT_TABLES) >= 256:
            LAYOUT_TABLES.clear()
        # not an inference tensor, even when the first call runs under torch.inference_mode: a later
        # call with autograd saves the tables for backward
        with torch.inference_mode(False):
            tables = LAYOUT_TABLES[key] = build_layout_tables(n, nr, device)
    return tables



def _levels_per_launch(layout: Layout, per_launch: int):
    """(base, levels) of each chained coarsen or fold launch."""
    base = 0
    while True:
        yield base, per_launch
        base += per_launch
        if base >= layout.top:
            return


def _coarsen(q, k, v, valid, rot, scale, nr, causal, layout, start_t, len_t):
    from . import triton_kernels as tk

    b, h, n, d = q.shape
    dev = q.device
    # three allocations: the custom op returns these, and its outputs may not alias one another; k and v
    # keep their own (kv) heads
    # level 0 of v is v itself (the window kernels read it in place): pv holds the coarse levels only
    pq, pk, pv = (alloc(b, t.shape[1], rows, d, device=dev, dtype=q.dtype)
                  for t, rows in ((q, layout.mtot), (k, layout.mtot), (v, max(layout.mtot - layout.m0, 1))))
    pc = alloc(b, layout.mtot, device=dev, dtype=torch.float32)
    pf = alloc(b, layout.mtot, device=dev, dtype=torch.int32)
    has_mask = valid is not None
    packed_strides = (*pq.stride()[:3], *pk.stride()[:3], *pv.stride()[:3])
    for base, lvl in _levels_per_launch(layout, tk.COARSEN_LV):
        raw = base == 0
        if raw:
            srcs, strides = (q, k, v), (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
            n_in, row0, sc = n, 0, scale * LOG2E
        else:
            srcs, strides = (pq, pk, pv), packed_strides
            n_in, row0, sc = layout.lengths[base], layout.starts[base], 1.0
        tk.coarsen_kernel[(layout.chunk_grid(base, lvl), b * h)](
            *srcs, valid if has_mask else pc, *(rot if rot is not None else (pc, pc)), pq, pk, pv, pc, pf,
            start_t, len_t,
            *strides, valid.stride(0) if has_mask else 0,
            h, h // k.shape[1], layout.mtot, n_in, row0, base, layout.top, sc,
            D=d, LVL=lvl, RAW=raw, HAS_MASK=has_mask, CAUSAL=causal, ROTARY=raw and rot is not None,
            num_warps=tk.COARSEN_WARPS,
        )
    return pq, pk, pv, pc, pf


@_on_device_of_first_argument
def _forward(q, k, v, valid, rot, tables, nr, causal, scale):
    """rot: the (2, N, D/2) rotary cos and sin tables, or None; tables: `layout_tables(N, nr)`."""
    from . import triton_kernels as tk

    rot = None if rot is None else rot.unbind(0)
    b, h, n, d = q.shape
    layout = packed_layout(n, nr)
    lo, hi, start_t, len_t = layout.split(tables)
    pq, pk, pv, pc, pf = _coarsen(q, k, v, valid, rot, scale, nr, causal, layout, start_t, len_t)
    mc = layout.mtot - layout.m0
    rows = max(mc, 1)  # never read without coarse levels, but kernels want a real pointer
    sa, sm, sl = _carve(alloc(b * h * rows * (d + 2), device=q.device, dtype=torch.float32),
                        (b, h, rows, d), (b, h, rows), (b, h, rows))  # one allocation for three
    out = _alloc_bnhd(b, h, n, d, q.device, q.dtype)
    lse = alloc(b, h, layout.m0, device=q.device, dtype=torch.float32)
    # the values: the coarse levels' (pv) above level 0, v itself at level 0 (the strides are v's)
    common = lambda values: (pq, pk, values, pc, lo, hi, start_t, sm, sl, sa, out, lse, *out.stride()[:3],
                             *v.stride()[:3], h, h // k.shape[1], layout.mtot, layout.m0, n)
    uniform = uniform_levels(n, nr, valid is not None)
    if mc:
        first, step, num_win = window_constants(False, causal)
        tk.launch(
            tk.window_fwd_kernel, lambda meta: (mc // meta["BLOCK_M"], b * h), *common(pv), layout.m0, layout.top,
            NR=nr, D=d, FIRST=first, STEP=step, NUM_WIN=num_win, LEVEL0=False, CAUSAL=causal, FINAL=False,
            UNIFORM=uniform,
        )
    first, step, num_win = window_constants(True, causal)
    tk.launch(
        tk.window_fwd_kernel, lambda meta: (layout.m0 // meta["BLOCK_M"], b * h), *common(v), 0, layout.top,
        NR=nr, D=d, FIRST=first, STEP=step, NUM_WIN=num_win, LEVEL0=True, CAUSAL=causal, FINAL=True,
        UNIFORM=uniform,
    )
    return out, lse, pq, pk, pv, pc, pf


@_on_device_of_first_argument
def _backward(dout, out, lse, pq, pk, pv, pc, pf, v, rot, tables, nr, causal, scale, uniform, grads=None):
    """pq ... pf: the forward's packed levels (pv: the coarse ones), v: the input values (level 0);
    grads: (dq, dk, dv) to write into, any strides (the packed path: views of one (B, N, 3, H, D)
    tensor); new ones when None."""
    from . import triton_kernels as tk

    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    rot = None if rot is None else rot.unbind(0)
    b, h, mtot, d = pq.shape
    hkv = pk.shape[1]
    n = out.shape[2]
    layout = packed_layout(n, nr)
    lo, hi, start_t, len_t = layout.split(tables)
    dev = pq.device
    pdo = alloc(b, h, mtot, d, device=dev, dtype=pq.dtype)
    plse, pdel = alloc(2, b, h, mtot, device=dev, dtype=torch.float32).unbind(0)
    for base, lvl in _levels_per_launch(layout, tk.LV):
        raw = base == 0
        n_in, row0 = (n, 0) if raw else (layout.lengths[base], layout.starts[base])
        tk.fold_kernel[(layout.chunk_grid(base, lvl), b * h)](
            dout, out, lse, pc, pdo, plse, pdel, start_t, len_t,
            *dout.stride()[:3], *out.stride()[:3],
            h, mtot, n_in, row0, base, layout.top,
            D=d, LVL=lvl, RAW=raw, num_warps=tk.FOLD_WARPS,
        )
    if grads is None:
        grads = (_alloc_bnhd(b, heads, n, d, dev, pq.dtype) for heads in (h, hkv, hkv))
    dq, dk, dv = grads
    # the coarse rows' gradients, in the input precision for half inputs (summed in float32 at level 0)
    gdtype = torch.float32 if pq.dtype == torch.float32 else pq.dtype
    mc = mtot - layout.m0
    crows = max(mc, 1)  # never read without coarse levels, but kernels want a real pointer
    cdq, cdk, cdv = _carve(alloc((h + 2 * hkv) * b * crows * d, device=dev, dtype=gdtype),
                           (b, h, crows, d), (b, hkv, crows, d), (b, hkv, crows, d))
    args = lambda values: (pq, pk, values, pc, lo, hi, pdo, plse, pdel, pf, start_t,
                           *(rot if rot is not None else (pc, pc)))
    sizes = (h, h // hkv, mtot, layout.m0, n)
    # coarse levels first: level 0 reads their gradients
    for level0, row0, rows in ((False, layout.m0, mc), (True, 0, layout.m0)):
        if not rows:
            continue
        first, step, num_win = window_constants(level0, causal)
        kw = {"NR": nr, "D": d, "FIRST": first, "STEP": step, "NUM_WIN": num_win, "LEVEL0": level0,
              "CAUSAL": causal, "UNIFORM": uniform, "ROTARY": level0 and rot is not None}
        gq, gk, gv = (dq, dk, dv) if level0 else (cdq, cdk, cdv)
        values = v if level0 else pv
        tk.launch(tk.window_bwd_dq_kernel, lambda meta, rows=rows: (rows // meta["BLOCK_M"], b * h), *args(values), gq,
                  cdq, *gq.stride()[:3], *v.stride()[:3], *sizes, row0, layout.top, scale, **kw)
        # one program per key tile of a kv head: it sums dk, dv over the query heads of its group
        tk.launch(tk.window_bwd_dkdv_kernel, lambda meta, rows=rows: (rows // meta["BLOCK_N"], b * hkv),
                  *args(values), gk, gv, cdk, cdv, *gk.stride()[:3], *gv.stride()[:3], *v.stride()[:3], *sizes, row0,
                  layout.top, **kw)
    return dq, dk, dv


def _packed_shapes(q: torch.Tensor, nr: int):
    b, h, n, d = q.shape
    lengths = level_lengths(n, nr)
    return b, h, n, d, sum(lengths), lengths[0]


@torch.library.custom_op("h_transformer_1d::hattn_fwd", mutates_args=())
def _hattn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
    rot: torch.Tensor | None, tables: torch.Tensor, nr: int, causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B,H,N,D), k, v (B,Hkv,N,D) (H a multiple of Hkv), valid (B,N) bool or None, rot (2, N, D/2)
    float32 cos and sin of the rotary angles (or None: no rotary), tables: `layout_tables(N, nr)` (int32
    on q's device).
    Returns the output (B,H,N,D), the base-2 lse per level-0 row (B,H,M0) and the packed levels
    (q, k, v's coarse levels, counts, first tokens) kept for backward."""
    return _forward(q, k, v, valid, rot, tables, nr, causal, scale)


@_hattn_fwd.register_fake
def _(q, k, v, valid, rot, tables, nr, causal, scale):
    b, h, n, d, mtot, m0 = _packed_shapes(q, nr)
    return (
        q.new_empty(b, n, h, d).transpose(1, 2),
        q.new_empty(b, h, m0, dtype=torch.float32),
        *(q.new_empty(b, t.shape[1], rows, d) for t, rows in ((q, mtot), (k, mtot), (v, max(mtot - m0, 1)))),
        q.new_empty(b, mtot, dtype=torch.float32),
        q.new_empty(b, mtot, dtype=torch.int32),
    )


@torch.library.custom_op("h_transformer_1d::hattn_bwd", mutates_args=())
def _hattn_bwd(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, pq: torch.Tensor, pk: torch.Tensor,
    pv: torch.Tensor, pc: torch.Tensor, pf: torch.Tensor, v: torch.Tensor, rot: torch.Tensor | None,
    tables: torch.Tensor, nr: int, causal: bool, scale: float, uniform: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, out, lse, pq, pk, pv, pc, pf, v, rot, tables, nr, causal, scale, uniform)


@_hattn_bwd.register_fake
def _(dout, out, lse, pq, pk, pv, pc, pf, v, rot, tables, nr, causal, scale, uniform):
    b, h, n, d = out.shape
    return tuple(out.new_empty(b, n, heads, d).transpose(1, 2) for heads in (h, pk.shape[1], pk.shape[1]))


def _keep_for_backward(ctx, forward_out, q, v, valid, rot, tables, nr, causal, scale):
    """What both autograd paths keep: the forward's outputs, the input values (level 0 of the packed
    values, which the kernels read in place), the rotary and layout tables and the launch settings."""
    ctx.save_for_backward(*forward_out, v, rot, tables)
    ctx.nr, ctx.causal, ctx.scale = nr, causal, scale
    ctx.uniform = uniform_levels(q.shape[2], nr, valid is not None)


def _setup_context(ctx, inputs, output):
    q, _, v, valid, rot, tables, nr, causal, scale = inputs
    _keep_for_backward(ctx, output, q, v, valid, rot, tables, nr, causal, scale)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs kept only for backward


def _grad(ctx, dout, *unused):
    if dout is None:
        return (None,) * 9
    dq, dk, dv = _hattn_bwd(dout, *ctx.saved_tensors, ctx.nr, ctx.causal, ctx.scale, ctx.uniform)
    return dq, dk, dv, *(None,) * 6


_hattn_fwd.register_autograd(_grad, setup_context=_setup_context)


def _eager_forward(ctx, q, k, v, valid, rot, tables, nr, causal, scale) -> torch.Tensor:
    forward_out = _forward(q, k, v, valid, rot, tables, nr, causal, scale)
    _keep_for_backward(ctx, forward_out, q, v, valid, rot, tables, nr, causal, scale)
    return forward_out[0]


class _EagerHAttention(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without the custom ops'
    dispatch, whose host time per call counts at small sizes, where the GPU waits for the host;
    torch.compile traces the custom ops instead, `fused_h_attention`)."""

    @staticmethod
    def forward(ctx, q, k, v, valid, rot, tables, nr, causal, scale):
        return _eager_forward(ctx, q, k, v, valid, rot, tables, nr, causal, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        grads = _backward(dout, *ctx.saved_tensors, ctx.nr, ctx.causal, ctx.scale, ctx.uniform)
        return *grads, *(None,) * 6


class _EagerHAttentionQKV(torch.autograd.Function):
    """The eager path for q, k, v that are views of one (B, N, 3, H, D) tensor `qkv` (a fused projection's
    output): takes `qkv` itself, so that the backward writes dq, dk, dv straight into one gradient of
    its layout. Through q, k, v the autograd graph would stack the three gradients and copy the stack
    into the projection's layout: two passes over three gradients per layer."""

    @staticmethod
    def forward(ctx, qkv, valid, rot, tables, nr, causal, scale):
        return _eager_forward(ctx, *split_qkv(qkv), valid, rot, tables, nr, causal, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        out = ctx.saved_tensors[0]
        b, h, n, d = out.shape
        dqkv = alloc(b, n, 3, h, d, device=out.device, dtype=out.dtype)
        _backward(dout, *ctx.saved_tensors, ctx.nr, ctx.causal, ctx.scale, ctx.uniform, grads=split_qkv(dqkv))
        return dqkv, *(None,) * 6


def split_qkv(qkv: torch.Tensor):
    """q, k, v (B, H, N, D) views of a (B, N, 3, H, D) tensor."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


ROTARY_TABLES: dict = {}


def rotary_table(n: int, freqs: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """(2, n, half) float32: cos and sin of position * freqs, as `rotary.apply_rotary` computes them;
    columns past the frequencies (a head dim zero-padded to the kernels' width, `half` of it) turn by
    angle 0.

    Cached per (n, frequencies): a model's layers share one table. The frequencies are known by their
    memory (address, layout, dtype, version), and each entry keeps its frequency tensor alive, so that its
    memory is not handed out again to other frequencies while the entry stands."""
    half = freqs.shape[0] if half is None else half

    def build():
        angles = torch.arange(n, device=freqs.device, dtype=torch.float32)[:, None] * freqs.float()
        angles = torch.nn.functional.pad(angles, (0, half - freqs.shape[0]))
        return torch.stack((angles.cos(), angles.sin()))

    if torch.compiler.is_compiling():
        return build()
    key = (n, half, freqs.data_ptr(), freqs.shape, freqs.stride(), freqs.dtype, freqs._version, str(freqs.device))
    entry = ROTARY_TABLES.get(key)
    if entry is None:
        if len(ROTARY_TABLES) >= 16:
            ROTARY_TABLES.clear()
        with torch.inference_mode(False):  # as in layout_tables: saved for backward by later calls
            entry = ROTARY_TABLES[key] = (freqs, build())
    return entry[1]


def fused_h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    rotary_freqs: torch.Tensor | None = None,
    qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hierarchical attention with the Triton kernels (inputs assumed validated and supported).

    qkv: the (B, N, 3, H, D) tensor whose views q, k, v are (`split_qkv`); eager calls then return
    its gradient as one tensor of its layout (`_EagerHAttentionQKV`)."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    width = kernel_head_dim(d)
    if width != d:  # zero columns: the same scores; rotary turns the zero pairs by angle 0 (they stay zero)
        pad = (0, width - d)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
        return fused_h_attention(
            q, k, v, block_size=block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            rotary_freqs=rotary_freqs,
        )[..., :d]
    block_size = effective_block_size(q.shape[2], block_size, MIN_BLOCK)  # past N / 2: plain attention
    valid = None
    if key_padding_mask is not None:
        valid = key_padding_mask.to(device=q.device, dtype=torch.bool)
        if valid.stride(-1) != 1:
            valid = valid.contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rot = None if rotary_freqs is None else rotary_table(q.shape[2], rotary_freqs.to(q.device), d // 2)
    tables = layout_tables(q.shape[2], block_size, q.device)
    if torch.compiler.is_compiling() or VIA_CUSTOM_OPS:
        return _hattn_fwd(q, k, v, valid, rot, tables, block_size, causal, scale)[0]
    if qkv is not None and qkv.stride(-1) == 1:
        return _EagerHAttentionQKV.apply(qkv, valid, rot, tables, block_size, causal, scale)
    return _EagerHAttention.apply(q, k, v, valid, rot, tables, block_size, causal, scale)

