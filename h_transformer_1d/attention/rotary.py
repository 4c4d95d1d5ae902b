"""Rotary position embedding (RoFormer) as the attention functions apply it to queries and keys."""

import torch


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, N, D): the feature pair (2i, 2i+1) at position p turns by p * inv_freq[i].

    positions: (N,) (then x may have any number of leading dims) or (B, N). Angles and the rotation
    are computed in float32 (the Triton kernels do the same) or, for float64 inputs, in float64; the
    result has x's dtype.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = positions.to(dtype)[..., None] * inv_freq.to(dtype)  # (..., N, D/2)
    if angles.dim() == 3:  # per-batch positions
        angles = angles[:, None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return rotated.to(x.dtype)
