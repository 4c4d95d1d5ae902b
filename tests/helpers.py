"""Helpers shared by the tests: error measures, masks of the shapes users produce, memory bounds."""

import math

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against the reference b (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def make_mask(kind: str, batch: int, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """Key padding masks (True = real token) of the shapes users produce."""
    if kind == "none":
        return None
    mask = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        cut = int(torch.randint(0, max(n // 2, 1), (1,), generator=generator)) + b
        if kind == "end":
            mask[b, n - cut :] = not cut
        elif kind == "start":
            mask[b, :cut] = False
        elif kind == "gaps":
            mask[b] = torch.rand(n, generator=generator) > 0.3
        else:
            raise ValueError(kind)
    mask[0, 0] = True  # keep one real token in the first row
    return mask


def stored_slots_bound(t: int, nr: int) -> float:
    """Groups kept over all levels: two blocks per level with keys, about 2 * nr for all younger levels."""
    return 2 * nr * (math.log2(t / nr) + 3)
