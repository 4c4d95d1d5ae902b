"""SequenceClassifier: one label per sequence from a non-causal HTransformer1D body."""

import torch
from torch import nn

from ...model import HTransformer1D

POOLS = ("mean", "cls")


class SequenceClassifier(nn.Module):
    """``model(x, mask)`` maps token ids (B, N) with a padding mask (B, N, True = real) to logits (B, C).

    The body's own layers do the encoding: its language-model head is replaced by an identity, so
    ``body(x, mask=mask)`` returns features (B, N, dim); a LayerNorm, a pooling and a two-layer MLP of
    width `hidden` (default dim; LRA's classifier head) make the logits. `pool="mean"` averages the
    features of the real tokens; `pool="cls"` takes position 0, where the input must hold a <cls>
    token. Padded positions never reach a real one (attention and token shift mask them), so their
    content is irrelevant.
    """

    def __init__(self, body: HTransformer1D, num_classes: int, pool: str = "mean", hidden: int | None = None):
        super().__init__()
        if body.causal:
            raise ValueError("a classifier needs a non-causal body (causal=False): every token sees the whole input")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        body.to_logits = nn.Identity()
        self.body, self.pool = body, pool
        dim, hidden = body.dim, hidden or body.dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.body(x, mask=mask))  # (B, N, dim)
        if self.pool == "cls":
            pooled = h[:, 0]
        elif mask is None:
            pooled = h.mean(1)
        else:
            real = mask[..., None]  # (B, N, 1)
            pooled = h.masked_fill(~real, 0.0).sum(1) / real.sum(1).clamp(min=1)
        return self.head(pooled)  # (B, num_classes)
