"""The public entry point `h_attention`: argument checks, then dispatch to an implementation."""

import math
import numbers

import torch

from . import fused
from .blocked import blocked_h_attention
from .geometry import effective_block_size
from .reference import hierarchical_attention_reference
from .rotary import apply_rotary

IMPLEMENTATIONS = ("auto", "reference", "blocked", "triton")


def check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 2, got {block_size}")


def check_probability(value, name: str) -> None:
    """A dropout probability: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_scale(scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite float or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale}")


def check_key_padding_mask(mask, batch: int, seq_len: int, name: str = "key_padding_mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"{name} must have shape (batch, seq_len) = {(batch, seq_len)}, got {tuple(mask.shape)}")


def check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, heads, seq_len, dim_head), got rank {t.dim()}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {t.dtype}")
    if (q.shape[0], q.shape[2]) != (k.shape[0], k.shape[2]) or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            "q, k and v must agree in (batch, seq_len) and k and v in heads, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for axis, name in ((0, "batch"), (1, "heads"), (3, "dim_head")):
        if q.shape[axis] == 0 or v.shape[axis] == 0:
            raise ValueError(f"q, k and v must have {name} >= 1, got shapes {tuple(q.shape)} and v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q's heads ({q.shape[1]}) must be a multiple of k's and v's heads ({k.shape[1]}): grouped-query "
            f"attention shares each kv head among heads // kv_heads query heads"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same dim_head, got {q.shape[-1]} and {k.shape[-1]}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def resolve_impl(q: torch.Tensor, block_size: int, dropout_p: float, impl: str, v_dim: int | None = None) -> str:
    """The implementation a call of `h_attention` runs: "triton", "blocked" or "reference".

    "auto" takes the kernels for CUDA inputs they handle without dropout, else the blocked path; an
    explicit request is checked here, so that it fails with a clear error instead of inside a kernel.
    `v_dim`: v's head dim when it differs from q's (the kernels take one head dim)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    same_dim = v_dim is None or v_dim == q.shape[-1]
    if impl == "auto":
        kernels = (
            q.is_cuda and dropout_p == 0.0 and same_dim and fused.supports(q, block_size) and fused.triton_usable(q)
        )
        return "triton" if kernels else "blocked"
    if impl == "triton" and not (
        fused.triton_usable(q) and fused.supports(q, block_size, allow_float32=True) and dropout_p == 0.0 and same_dim
    ):
        raise ValueError(
            "impl='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1), float16/bfloat16/float32, "
            f"dim_head <= {fused.MAX_HEAD_DIM} (v's the same as q's), block_size in "
            f"[{fused.MIN_BLOCK}, {fused.MAX_BLOCK}] (or at least N / 2) and dropout_p=0; got {q.device.type} "
            f"{q.dtype}, dim_head={q.shape[-1]}, v dim_head={q.shape[-1] if v_dim is None else v_dim}, "
            f"block_size={block_size}, dropout_p={dropout_p}"
        )
    if impl == "reference" and dropout_p:
        raise ValueError("impl='reference' does not support dropout_p > 0")
    return impl


def _check_rotary(freqs, q: torch.Tensor) -> None:
    if freqs is None:
        return
    if not isinstance(freqs, torch.Tensor) or not freqs.is_floating_point():
        raise TypeError(f"rotary_freqs must be a floating point torch.Tensor, got {type(freqs).__name__}")
    d = q.shape[-1]
    if d % 2 or tuple(freqs.shape) != (d // 2,):
        raise ValueError(
            f"rotary_freqs must have shape (dim_head / 2,) = ({d // 2},) for an even dim_head, "
            f"got {tuple(freqs.shape)} with dim_head={d}"
        )


def h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rotary_freqs: torch.Tensor | None = None,
    impl: str = "auto",
    _qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hierarchical attention (H-Transformer-1D) on q (B, H, N, D), k (B, Hkv, N, D), v (B, Hkv, N, Dv);
    returns (B, H, N, Dv).

    Args:
        q, k, v: queries, keys, values; any N >= 1, any floating dtype (half precision accumulates
            in float32). v may have its own head dim Dv (not on the Triton kernels). k and v may have
            fewer heads than q (grouped-query attention; Hkv = 1: multi-query): H must be a multiple
            of Hkv, and query head h attends with kv head ``h // (H // Hkv)`` (the convention of
            SDPA's ``enable_gqa``). Only the dense reference repeats k and v per query head
            in memory.
        block_size: Nr, the width of the finest blocks; a power of two >= 2. One at or above N / 2
            gives plain attention, computed at the cost of plain attention on N.
        causal: (bool) each position attends only to itself and earlier positions.
        key_padding_mask: (B, N) bool, True = real token. Padded positions are never keys and
            their outputs are zero; their contents (even NaN or Inf) reach no output and no gradient.
        scale: score scale, a finite float; default ``dim_head ** -0.5``.
        dropout_p: dropout on the attention weights, in [0, 1) (training only; the normaliser is not
            dropped).
        rotary_freqs: (dim_head / 2,) inverse frequencies: rotate q and k by rotary position
            embeddings at positions 0..N-1 first (the pair (2i, 2i+1) at position p turns by
            p * rotary_freqs[i], see `rotary.apply_rotary`). The Triton kernels do it on the fly,
            which saves the rotated copies and their backward.
        impl: "auto" (the fastest correct implementation for the inputs: the Triton kernels for
            float16/bfloat16 CUDA tensors with head dim up to 256, block size 16-512 and no dropout,
            else the blocked PyTorch path), "triton" (the kernels; float32 runs through TF32),
            "blocked", or "reference" (the dense O(N^2) definition, for testing).
    """
    check_qkv(q, k, v)
    check_block_size(block_size)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    check_key_padding_mask(key_padding_mask, q.shape[0], q.shape[2])
    _check_scale(scale)
    check_probability(dropout_p, "dropout_p")
    _check_rotary(rotary_freqs, q)
    # a block size past N / 2 means plain attention: computed with a smaller one, at plain attention's cost
    block_size = effective_block_size(q.shape[2], block_size, fused.MIN_BLOCK)
    path = resolve_impl(q, block_size, dropout_p, impl, v.shape[-1])
    if path == "triton":  # the kernels rotate q and k as they load them
        return fused.fused_h_attention(
            q, k, v, block_size=block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            rotary_freqs=rotary_freqs, qkv=_qkv,
        )
    if rotary_freqs is not None:
        positions = torch.arange(q.shape[2], device=q.device)
        q, k = apply_rotary(q, positions, rotary_freqs), apply_rotary(k, positions, rotary_freqs)
    if path == "reference":
        return hierarchical_attention_reference(
            q, k, v, block_size=block_size, causal=causal, key_padding_mask=key_padding_mask, scale=scale
        )
    return blocked_h_attention(
        q,
        k,
        v,
        block_size=block_size,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        dropout_p=dropout_p,
    )


def h_attention_qkv(qkv: torch.Tensor, **kwargs) -> torch.Tensor:
    """`h_attention` on the queries, keys and values packed as a fused projection makes them:
    qkv (B, N, 3, H, D), e.g. ``to_qkv(x).unflatten(-1, (3, heads, dim_head))``; returns (B, H, N, D).

    The same as ``h_attention(q, k, v, **kwargs)`` with ``q, k, v = (t.transpose(1, 2) for t in
    qkv.unbind(2))``, except that with the Triton kernels, outside torch.compile, the gradient comes back
    as one tensor of qkv's layout: no stacking of dq, dk, dv and no copy into the projection's layout.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seq_len, 3, heads, dim_head), got {tuple(qkv.shape)}")
    q, k, v = fused.split_qkv(qkv)
    return h_attention(q, k, v, _qkv=qkv, **kwargs)
