"""Incremental decoding of a causal HTransformer1D: a cache per model, one state per sublayer.

`prefill` runs the parallel forward on a prompt and fills the cache on the way; `decode_step` then
feeds one token per sequence through every layer at a cost that does not grow with the context
(DESIGN.md section 2). The logits equal the full forward's on the whole sequence, to float rounding.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..attention.incremental import HierarchicalCache
from .layers import HAttention1D


@dataclass
class SublayerCache:
    """What one pre-norm sublayer keeps of the past while decoding."""

    attention: HierarchicalCache | None = None  # attention sublayers only
    previous: torch.Tensor | None = None  # (B, dim) normed features of the last position (token shift)

    def stored_tensors(self) -> list[torch.Tensor]:
        kept = [] if self.attention is None else self.attention.stored_tensors()
        return kept + ([] if self.previous is None else [self.previous])


def supports_decoding_cache(model: nn.Module) -> bool:
    """Whether `model` is an HTransformer1D whose attention layers are all causal and hierarchical."""
    blocks = getattr(getattr(model, "layers", None), "blocks", None)
    if not getattr(model, "causal", False) or blocks is None:
        return False
    attention_layers = [block.f.fn for block in blocks]
    return all(isinstance(layer, HAttention1D) and layer.attention == "hierarchical" for layer in attention_layers)


class DecodingCache:
    """Per block of `model`, the (attention, feedforward) `SublayerCache`s; empty until a prefill."""

    def __init__(self, model: nn.Module):
        if not supports_decoding_cache(model):
            raise ValueError("a DecodingCache needs HTransformer1D(..., causal=True) with attention='hierarchical'")
        self.blocks = [
            (SublayerCache(attention=HierarchicalCache(block.f.fn.block_size)), SublayerCache())
            for block in model.layers.blocks
        ]

    @property
    def length(self) -> int:
        """Positions seen so far, padding included: the next token's position."""
        return self.blocks[0][0].attention.length

    def stored_tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.blocks for sublayer in pair for t in sublayer.stored_tensors()]


def prefill(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None):
    """Logits (B, T, num_tokens) of the prompt `tokens` (B, T) and the cache to continue it from."""
    cache = DecodingCache(model)
    return model(tokens, mask=mask, cache=cache), cache


def decode_step(model: nn.Module, cache: DecodingCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per sequence, `tokens` (B,), at position `cache.length`; its logits (B, num_tokens)."""
    if cache.length == 0:
        raise ValueError("decode_step needs a cache filled by prefill")
    return model(tokens[:, None], cache=cache)[:, 0]
