"""h-transformer-1d: fast, exact H-Transformer-1D hierarchical attention (Zhu & Soricut, ACL 2021)."""

from .apps.runs import load
from .attention import h_attention, h_attention_qkv, h_attention_varlen
from .model import AutoregressiveWrapper, CausalHAttention1D, HAttention1D, HTransformer1D

# the source tree's version; `h-transformer-1d --version` reports the installed distribution's
__version__ = "0.2.0"
__all__ = [
    "AutoregressiveWrapper",
    "CausalHAttention1D",
    "HAttention1D",
    "HTransformer1D",
    "h_attention",
    "h_attention_qkv",
    "h_attention_varlen",
    "load",
]
