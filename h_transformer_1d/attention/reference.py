"""The definition of hierarchical attention (docs/design.md), written densely.

This is the test oracle: it builds the full N x N piecewise-constant score matrix ``S_H`` and applies
one ordinary row softmax. It is O(N^2) in time and memory and meant for float64 checks on small
inputs, never for training.
"""

import torch

from .geometry import covering_level, num_levels


def _group_mean(x: torch.Tensor, valid: torch.Tensor, level: int) -> torch.Tensor:
    """Mean of x (B, H, N, D) over the valid positions of each position's level-`level` group."""
    n = x.shape[-2]
    group = torch.arange(n, device=x.device) >> level
    same = group[:, None] == group[None, :]  # (N, N): j in i's group
    weights = (same[None] & valid[:, None, :]).to(x.dtype)  # (B, N, N)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("bij,bhjd->bhid", weights, x)


def _first_valid_query(q: torch.Tensor, valid: torch.Tensor, level: int) -> torch.Tensor:
    """Causal coarse query: q at the first valid position of each position's level-`level` group."""
    n = q.shape[-2]
    pos = torch.arange(n, device=q.device)
    group = pos >> level
    # for every position i, the smallest valid j in its group (or i itself if none is valid)
    candidate = torch.where(valid[:, None, :] & (group[:, None] == group[None, :])[None], pos, n)
    first = candidate.min(-1).values  # (B, N)
    first = torch.where(first == n, pos[None], first)
    return torch.gather(q, 2, first[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))


def hierarchical_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense hierarchical attention on (B, H, N, D) tensors; returns (B, H, N, D).

    Computes ``softmax(S_H) @ v`` where ``S_H[i, j] = scale * qbar_l(i) . kbar_l(j)`` at the level l
    covering (i, j); padded keys and (when causal) future keys get -inf. Padded query rows and rows
    with no valid key are zero.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    valid = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask.to(torch.bool)
    )
    level_map = covering_level(n, block_size, q.device)  # (N, N)
    scores = torch.zeros(b, h, n, n, dtype=q.dtype, device=q.device)
    for level in range(num_levels(n, block_size) + 1):
        if causal and level > 0:
            q_level = _first_valid_query(q, valid, level)
        else:
            q_level = _group_mean(q, valid, level)
        k_level = _group_mean(k, valid, level)
        level_scores = scale * q_level @ k_level.transpose(-1, -2)
        scores = torch.where(level_map == level, level_scores, scores)

    allowed = valid[:, None, None, :].expand(b, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1).masked_fill(~has_key, 0.0)
    out = probs @ v
    return out.masked_fill(~valid[:, None, :, None], 0.0)
