"""Level geometry of hierarchical attention: how many levels a length has, their padded sizes, which
level covers a (query, key) pair and which key blocks a level's window holds. Every implementation
(reference, blocked, fused kernels, incremental decoding) takes these from here."""

import torch


def num_levels(seq_len: int, block_size: int) -> int:
    """Index of the top level: the first level whose blocks (``block_size * 2**l`` wide) number <= 2."""
    level = 0
    while -(-seq_len // (block_size << level)) > 2:
        level += 1
    return level


def effective_block_size(seq_len: int, block_size: int, smallest: int = 2) -> int:
    """The block size to compute `block_size` with at this length: the same result at the least cost.

    Once ``N <= 2 * block_size`` there is only level 0 and the definition is plain attention whatever the
    block size, but the fast paths and caches allocate by it (whole blocks, windows of three); so it is
    cut to the smallest power of two ``>= smallest`` that still has ``N <= 2 * block_size``."""
    if seq_len >= block_size:  # nothing to cut (one test, so that a symbolic N under torch.compile keeps one graph)
        return block_size
    enough = 1 << max(0, (seq_len + 1) // 2 - 1).bit_length()  # the smallest power of two >= N / 2
    return min(block_size, max(smallest, enough))


def level_lengths(seq_len: int, block_size: int) -> list[int]:
    """Rows of each level 0 .. num_levels when every level is padded to whole blocks."""
    return [-(-seq_len // (block_size << lv)) * block_size for lv in range(num_levels(seq_len, block_size) + 1)]


def top_causal_level(position: int, block_size: int) -> int:
    """The coarsest level with keys for `position` under the causal rule (0: only the fine blocks): level l
    has keys once the position's level-l group lies past the first block of groups."""
    return max(0, (position // block_size).bit_length() - 1)


def window_offsets(causal: bool, level: int) -> tuple[int, ...]:
    """Block offsets of a level's key window, relative to the query block: level 0 the blocks c-1, c, c+1
    (causal: c-1, c); coarse levels c-1 and c+1 (causal: c-1)."""
    if level == 0:
        return (-1, 0) if causal else (-1, 0, 1)
    return (-1,) if causal else (-1, 1)


def covering_level(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """(N, N) long: the level at which key j is covered for query i (non-causal map)."""
    pos = torch.arange(seq_len, device=device)
    level_map = torch.full((seq_len, seq_len), -1, dtype=torch.long, device=device)
    for level in range(num_levels(seq_len, block_size) + 1):
        block = pos // (block_size << level)
        in_window = (block[:, None] - block[None, :]).abs() <= 1
        level_map = torch.where((level_map < 0) & in_window, level, level_map)
    return level_map
