"""Hierarchical attention: the definition (`reference`), the blocked PyTorch path and `h_attention`."""

from .blocked import blocked_h_attention
from .geometry import covering_level, level_lengths, num_levels
from .incremental import HierarchicalCache
from .interface import h_attention, h_attention_qkv
from .reference import hierarchical_attention_reference
from .varlen import h_attention_varlen

__all__ = [
    "HierarchicalCache",
    "blocked_h_attention",
    "covering_level",
    "h_attention",
    "h_attention_qkv",
    "h_attention_varlen",
    "hierarchical_attention_reference",
    "level_lengths",
    "num_levels",
]
