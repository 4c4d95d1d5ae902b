"""Rotary position embedding (RoFormer) as the attention functions apply it to queries and keys."""

import torch


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin of ``positions[..., None] * inv_freq`` in `dtype`: each (..., D/2)."""
    angles = positions.to(dtype)[..., None] * inv_freq.to(dtype)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each feature pair (2i, 2i+1) of x (..., D) by the angle whose cos and sin (broadcasting to
    (..., D/2)) are given; computed in cos's dtype, returned in x's."""
    x1, x2 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, D): the feature pair (2i, 2i+1) at position p turns by p * inv_freq[i].

    positions: (N,) (then x may have any number of leading dims) or (B, N). Angles and the rotation
    are computed in float32 (the Triton kernels do the same) or, for float64 inputs, in float64; the
    result has x's dtype.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rotary_angles(positions, inv_freq, dtype)  # (..., N, D/2)
    if cos.dim() == 3:  # per-batch positions
        cos, sin = cos[:, None], sin[:, None]
    return rotate(x, cos, sin)
