"""h-transformer-1d: fast, exact H-Transformer-1D hierarchical attention (Zhu & Soricut, ACL 2021)."""

from .attention import h_attention, h_attention_qkv
from .model import AutoregressiveWrapper, CausalHAttention1D, HAttention1D, HTransformer1D

__version__ = "0.2.0"
__all__ = [
    "h_attention",
    "h_attention_qkv",
    "HTransformer1D",
    "HAttention1D",
    "CausalHAttention1D",
    "AutoregressiveWrapper",
]
