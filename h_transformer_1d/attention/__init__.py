"""Hierarchical attention: the definition (`reference`), the blocked PyTorch path and `h_attention`."""

from .blocked import blocked_h_attention
from .incremental import HierarchicalCache
from .interface import h_attention, h_attention_qkv
from .reference import covering_level, hierarchical_attention_reference, num_levels

__all__ = [
    "h_attention",
    "h_attention_qkv",
    "blocked_h_attention",
    "HierarchicalCache",
    "hierarchical_attention_reference",
    "covering_level",
    "num_levels",
]
