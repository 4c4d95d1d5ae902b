"""Hierarchical attention through the Triton kernels: autograd Function and launch logic.

Forward: the coarse levels (packed into one launch) give an unnormalised softmax state per coarse
query; these are merged coarse to fine (log-sum-exp, base 2) down to level 1; the level-0 kernel
starts its online softmax from that state, so every query ends with one softmax over all levels and
stores one log-sum-exp. Backward: the level-0 kernels recompute probabilities from that log-sum-exp.
For a coarse level, all fine queries of a group share the same scores, so their gradients fold into
one coarse row: ``dObar = sum_i 2^(ref - lse_i) dO_i`` and ``Dbar = sum_i 2^(ref - lse_i) D_i`` with
``ref = min_i lse_i`` (every coarse weight of the group is <= 2^-ref, so nothing overflows); the same
backward kernels then run on the coarse rows. Coarsening itself (means, sums, sampled causal
queries) is plain PyTorch outside the Function, so autograd spreads coarse gradients back to the
group members.
"""

import torch
import torch.nn.functional as F

from .blocked import _pad_seq, coarse_levels
from .reference import num_levels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MIN_BLOCK, MAX_BLOCK = 16, 256


def supports(q: torch.Tensor, block_size: int, allow_float32: bool = False) -> bool:
    """Whether the kernels handle these inputs (float32 only on request: it runs through TF32)."""
    return (
        (q.dtype in SUPPORTED_DTYPES or (allow_float32 and q.dtype == torch.float32))
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and MIN_BLOCK <= block_size <= MAX_BLOCK
    )


def _alloc(*shape, device, dtype) -> torch.Tensor:
    """Every kernel output comes from here, so tests can poison it with NaN."""
    return torch.empty(*shape, device=device, dtype=dtype)


def _window(level0: bool, causal: bool) -> tuple[int, int, int]:
    """(FIRST, STEP, NUM_WIN): the key blocks c + FIRST + w * STEP of query block c."""
    if level0:
        return (-1, 1, 2) if causal else (-1, 1, 3)
    return (-1, 2, 1) if causal else (-1, 2, 2)


def _launch_fwd(q, k, v, cnt, lo, hi, nr, level0, causal, init=None, final=True):
    from . import triton_kernels as tk

    b, h, m, d = q.shape
    if final:
        out = _alloc(b, h, m, d, device=q.device, dtype=q.dtype)
        m_out = _alloc(b, h, m, device=q.device, dtype=torch.float32)
        l_out = m_out  # unused
    else:
        out = _alloc(b, h, m, d, device=q.device, dtype=torch.float32)
        m_out = _alloc(b, h, m, device=q.device, dtype=torch.float32)
        l_out = _alloc(b, h, m, device=q.device, dtype=torch.float32)
    if init is None:
        m_in, l_in, a_in = m_out, l_out, out  # placeholders, never read
    else:
        m_in, l_in, a_in = init
    first, step, num_win = _window(level0, causal)
    tk.window_fwd_kernel[lambda meta: (m // meta["BLOCK_M"], b * h)](
        q, k, v, cnt, lo, hi, m_in, l_in, a_in, out, m_out, l_out,
        q.stride(0), q.stride(1), q.stride(2),
        cnt.stride(0),
        m_out.stride(0), m_out.stride(1),
        a_in.stride(0), a_in.stride(1), a_in.stride(2),
        m_in.stride(0), m_in.stride(1),
        h,
        NR=nr, D=d, FIRST=first, STEP=step, NUM_WIN=num_win,
        LEVEL0=level0, CAUSAL=causal, HAS_INIT=init is not None, FINAL=final,
    )
    return (out, m_out) if final else (out, m_out, l_out)


def _launch_bwd(q, k, v, cnt, lo, hi, do, lse, delta, nr, level0, causal):
    from . import triton_kernels as tk

    b, h, m, d = q.shape
    first, step, num_win = _window(level0, causal)
    dq, dk, dv = (_alloc(b, h, m, d, device=q.device, dtype=torch.float32) for _ in range(3))
    common = dict(NR=nr, D=d, FIRST=first, STEP=step, NUM_WIN=num_win, LEVEL0=level0, CAUSAL=causal)
    strides = (q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2),
               cnt.stride(0), lse.stride(0), lse.stride(1), h)
    tk.window_bwd_dq_kernel[lambda meta: (m // meta["BLOCK_M"], b * h)](
        q, k, v, cnt, lo, hi, do, lse, delta, dq, *strides, **common
    )
    tk.window_bwd_dkdv_kernel[lambda meta: (m // meta["BLOCK_N"], b * h)](
        q, k, v, cnt, lo, hi, do, lse, delta, dk, dv, *strides, **common
    )
    return dq, dk, dv


def _merge2(m_a, l_a, o_a, m_b, l_b, o_b):
    m = torch.maximum(m_a, m_b)
    wa, wb = torch.exp2(m_a - m), torch.exp2(m_b - m)
    return m, l_a * wa + l_b * wb, o_a * wa[..., None] + o_b * wb[..., None]


def _up(x: torch.Tensor, length: int) -> torch.Tensor:
    return x.repeat_interleave(2, dim=2)[:, :, :length]


def _merge_down(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, lengths: list[int]):
    """Softmax states of the packed coarse levels, merged coarse to fine down to level 1."""
    starts = [0]
    for length in lengths[1:]:
        starts.append(starts[-1] + length)
    state = None
    for level in range(len(lengths) - 1, 0, -1):
        sl = slice(starts[level - 1], starts[level])
        part = (m[:, :, sl], l[:, :, sl], acc[:, :, sl])
        state = part if state is None else _merge2(*(_up(t, lengths[level]) for t in state), *part)
    return tuple(t.contiguous() for t in state)


def _fold_rows(lse: torch.Tensor, do: torch.Tensor, out: torch.Tensor, lengths: list[int]):
    """Delta = rowsum(dO * O) per fine query, and per coarse level the folded rows of each group:
    ref = min lse, dObar = sum 2^(ref - lse) dO, Dbar = sum 2^(ref - lse) Delta (packed)."""
    delta = (do.float() * out.float()).sum(-1)
    refs, dobars, dbars = [], [], []
    ref, dobar, dbar = lse, do.float(), delta
    for length in lengths[1:]:
        pairs = F.pad(ref, (0, 2 * length - ref.shape[2]), value=float("inf")).unflatten(2, (length, 2))
        new_ref = pairs.amin(-1)
        safe = torch.where(torch.isinf(new_ref), 0.0, new_ref)
        weight = torch.exp2(safe[..., None] - pairs)  # <= 1; 0 for rows without keys (lse = +inf)
        dobar = (_pad_seq(dobar, 2 * length).unflatten(2, (length, 2)) * weight[..., None]).sum(3)
        dbar = (_pad_seq(dbar, 2 * length).unflatten(2, (length, 2)) * weight).sum(3)
        ref = new_ref
        refs.append(safe)
        dobars.append(dobar)
        dbars.append(dbar)
    if not refs:
        return delta, None, None, None
    return delta, torch.cat(refs, 2), torch.cat(dobars, 2).to(do.dtype), torch.cat(dbars, 2)


@torch.library.custom_op("h_transformer_1d::hattn_fwd", mutates_args=())
def _hattn_fwd(
    q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, cnt0: torch.Tensor,
    qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cntc: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, nr: int, causal: bool, lengths: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """q0, k0, v0 (B,H,M0,D) fine; qc, kc, vc (B,H,Mc,D) coarse levels 1.. packed; counts (B, M).

    Returns the output (B,H,M0,D) and the base-2 log-sum-exp per fine query (B,H,M0).
    """
    top = len(lengths) - 1
    nb0 = lengths[0] // nr
    init = None
    if top:
        acc, m, l = _launch_fwd(qc, kc, vc, cntc, lo[nb0:], hi[nb0:], nr, False, causal, final=False)
        init = _merge_down(m, l, acc, lengths)
    return _launch_fwd(q0, k0, v0, cnt0, lo[:nb0], hi[:nb0], nr, True, causal, init=init, final=True)


@_hattn_fwd.register_fake
def _(q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, nr, causal, lengths):
    return torch.empty_like(q0), q0.new_empty(q0.shape[:3], dtype=torch.float32)


@torch.library.custom_op("h_transformer_1d::hattn_bwd", mutates_args=())
def _hattn_bwd(
    dout: torch.Tensor, q0: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, cnt0: torch.Tensor,
    qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cntc: torch.Tensor,
    lo: torch.Tensor, hi: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    nr: int, causal: bool, lengths: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    nb0 = lengths[0] // nr
    do = dout.contiguous()
    delta, refs, dobars, dbars = _fold_rows(lse, do, out, lengths)
    dq0, dk0, dv0 = _launch_bwd(q0, k0, v0, cnt0, lo[:nb0], hi[:nb0], do, lse, delta, nr, True, causal)
    dqc, dkc, dvc = (torch.empty_like(t) for t in (qc, kc, vc))
    if refs is not None:
        grads = _launch_bwd(qc, kc, vc, cntc, lo[nb0:], hi[nb0:], dobars, refs, dbars, nr, False, causal)
        dqc, dkc, dvc = (t.to(qc.dtype) for t in grads)
    return dq0.to(q0.dtype), dk0.to(k0.dtype), dv0.to(v0.dtype), dqc, dkc, dvc


@_hattn_bwd.register_fake
def _(dout, q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, out, lse, nr, causal, lengths):
    return tuple(torch.empty_like(t) for t in (q0, k0, v0, qc, kc, vc))


def _setup_context(ctx, inputs, output):
    q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, nr, causal, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, out, lse)
    ctx.nr, ctx.causal, ctx.lengths = nr, causal, lengths


def _backward(ctx, dout, dlse):
    q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, out, lse = ctx.saved_tensors
    dq0, dk0, dv0, dqc, dkc, dvc = _hattn_bwd(
        dout, q0, k0, v0, cnt0, qc, kc, vc, cntc, lo, hi, out, lse, ctx.nr, ctx.causal, ctx.lengths
    )
    return dq0, dk0, dv0, None, dqc, dkc, dvc, None, None, None, None, None, None


_hattn_fwd.register_autograd(_backward, setup_context=_setup_context)


_LEVEL_TABLES: dict = {}


def _level_table(lengths: tuple[int, ...], nr: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of the fine level then the packed coarse levels: [lo, hi) of its level's blocks.

    Cached per shape: building it is a host-to-device copy, which would stall the launch queue.
    """
    key = (lengths, nr, str(device))
    if key not in _LEVEL_TABLES or torch.compiler.is_compiling():
        rows, start = [(0, lengths[0] // nr)] * (lengths[0] // nr), 0
        for length in lengths[1:]:
            rows += [(start // nr, (start + length) // nr)] * (length // nr)
            start += length
        table = torch.tensor(rows, dtype=torch.int32, device=device).t().contiguous()
        if torch.compiler.is_compiling():
            return table[0], table[1]
        if len(_LEVEL_TABLES) >= 256:  # many distinct lengths (variable-length batches): start over
            _LEVEL_TABLES.clear()
        _LEVEL_TABLES[key] = (table[0], table[1])
    return _LEVEL_TABLES[key]


def _prepare(q, k, v, valid, masked: bool, scale: float, lengths: list[int], causal: bool):
    """Fine inputs padded to whole blocks (padded content zeroed) and the coarse levels 1.. packed.

    Coarse queries and keys are means over valid positions (causal queries: the first valid
    position), values are means too, entering the kernels with weight count. Sums accumulate in
    float32; the packed levels are in the input dtype.
    """
    b, h, n, d = q.shape
    count = _pad_seq(valid[:, None].float(), lengths[0])[:, 0]  # (B, M0)
    q0, k0, v0 = (_pad_seq(t, lengths[0]) for t in (q * scale, k, v))
    if masked:
        keep = _pad_seq(valid[:, None, :, None], lengths[0])
        q0, k0, v0 = (t.masked_fill(~keep, 0.0) for t in (q0, k0, v0))
    levels = list(coarse_levels(q0, k0, v0, count, lengths, causal))
    if levels:
        qs, ks, vs, cs = zip(*levels)
        qc, kc, vc = (torch.cat([x.to(q.dtype) for x in t], 2) for t in (qs, ks, vs))
        cntc = torch.cat(cs, 1)
    else:
        qc, kc, vc = (q0.new_empty(b, h, 0, d) for _ in range(3))
        cntc = count.new_empty(b, 0)
    return q0, k0, v0, count, qc, kc, vc, cntc


def fused_h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Hierarchical attention with the Triton kernels (inputs assumed validated and supported)."""
    b, h, n, d = q.shape
    nr = block_size
    scale = d**-0.5 if scale is None else scale
    lengths = [-(-n // (nr << lv)) * nr for lv in range(num_levels(n, nr) + 1)]
    if key_padding_mask is None:
        valid = torch.ones(b, n, device=q.device, dtype=torch.bool)
    else:
        valid = key_padding_mask.to(device=q.device, dtype=torch.bool)
    lo, hi = _level_table(tuple(lengths), nr, q.device)
    masked = key_padding_mask is not None
    q0, k0, v0, count, qc, kc, vc, cntc = _prepare(q, k, v, valid, masked, scale, lengths, causal)
    out, _ = _hattn_fwd(
        q0.contiguous(), k0.contiguous(), v0.contiguous(), count.contiguous(),
        qc.contiguous(), kc.contiguous(), vc.contiguous(), cntc.contiguous(), lo, hi, nr, causal, lengths,
    )
    out = out[:, :, :n]
    if key_padding_mask is not None:
        out = out.masked_fill(~valid[:, None, :, None], 0.0)
    return out
