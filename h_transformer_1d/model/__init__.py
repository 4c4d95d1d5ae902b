"""The model: attention layers, the HTransformer1D stack and the autoregressive wrapper."""

from .autoregressive import AutoregressiveWrapper
from .cache import DecodingCache, StaticDecoder, decode_step, prefill
from .layers import CausalHAttention1D, HAttention1D
from .transformer import HTransformer1D

__all__ = [
    "AutoregressiveWrapper",
    "CausalHAttention1D",
    "DecodingCache",
    "HAttention1D",
    "HTransformer1D",
    "StaticDecoder",
    "decode_step",
    "prefill",
]
