"""The definition of hierarchical attention (docs/design.md), written densely.

This is the test oracle: it builds the full N x N piecewise-constant score matrix ``S_H`` and applies
one ordinary row softmax. It is O(N^2) in time and memory and meant for float64 checks on small
inputs, never for training.
"""

import torch

from .geometry import covering_level, num_levels


def _group_mean(x: torch.Tensor, valid: torch.Tensor, level: int) -> torch.Tensor:
    """Mean of x (B, H, N, D) over the valid positions of each position's level-`level` group (x is
    zero where not valid). Each group is summed on its own: no position's content enters another group."""
    b, h, n, d = x.shape
    size = 1 << level
    groups = -(-n // size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, groups * size - n))
    sums = padded.view(b, h, groups, size, d).sum(3)  # (B, H, G, D)
    counts = torch.nn.functional.pad(valid, (0, groups * size - n)).view(b, groups, size).sum(2)
    means = sums / counts.clamp(min=1)[:, None, :, None].to(x.dtype)
    return means.repeat_interleave(size, dim=2)[:, :, :n]


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


def _causal_weighted_sum(probs: torch.Tensor, v: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """probs (B, H, N, N) lower triangular @ v (B, H, N, Dv), where no row reads a later position's v at
    all: a zero weight times a NaN or Inf value would still be NaN. Row block [r0, r1) takes the keys
    before r0 by a product and its diagonal block by a selection."""
    n = v.shape[-2]
    out = []
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        diag = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=v.device).tril()
        vd = torch.where(diag[:, :, None], v[:, :, None, r0:r1], 0.0)  # (B, H, rows, rows, Dv)
        part = torch.einsum("bhij,bhijd->bhid", probs[..., r0:r1, r0:r1], vd)
        out.append(part + probs[..., r0:r1, :r0] @ v[..., :r0, :])
    return torch.cat(out, dim=-2)


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
    """Dense hierarchical attention on q (B, H, N, D), k (B, Hkv, N, D) and v (B, Hkv, N, Dv), H a multiple
    of Hkv (query head i uses kv head i // (H // Hkv)); returns (B, H, N, Dv).

    Computes ``softmax(S_H) @ v`` where ``S_H[i, j] = scale * qbar_l(i) . kbar_l(j)`` at the level l
    covering (i, j); padded keys and (when causal) future keys get -inf. Padded query rows and rows
    with no valid key are zero. Padded positions' contents and (causal) later positions' contents
    never reach an output, whatever they hold (NaN, Inf): they are selected away, never multiplied by 0.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    # grouped-query attention: query head i uses kv head i // (H // Hkv); the dense definition repeats them
    k, v = (t.repeat_interleave(h // t.shape[1], dim=1) for t in (k, v))
    valid = (
        torch.ones(b, n, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask.to(torch.bool)
    )
    real = valid[:, None, :, None]
    q, k, v = (torch.where(real, t, 0.0) for t in (q, k, v))
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
    out = _causal_weighted_sum(probs, v) if causal else probs @ v
    return out.masked_fill(~real, 0.0)
