"""Causal hierarchical attention one position at a time, from a cache of O(block_size * log t) vectors.

docs/design.md (decoding). For position t and level l >= 1, let ``g = t >> l`` (t's level-l group) and
``c = g // block_size``. The level-l keys are the groups of block ``c - 1`` (only its first half when g
sits in the first half of its block: the level below covers the rest), and the query is q at the first
valid position of group g. All those key groups are complete before g starts, so the level's softmax
state is computed once per group and reused by the group's later positions. Level 0 (fine blocks
``c - 1`` and ``c``, causal) changes with every position. Levels exist for t while ``c >= 1``, so they
appear one by one as t grows.

Per level the cache keeps a ring of the last two blocks of groups, as sums of k and v and counts of
valid positions (group g in slot ``g % (2 * block_size)``). A group's sums are the sums of its two
children, added when the second child completes: the same pairwise sums, in the same order, as the
blocked forward's coarsening, so decoding reproduces it to rounding of the matmuls.

Prompts of different lengths (``prefill(..., lengths=)``, right padded): each row keeps its own
position, so its groups, ring slots and rotary positions count from its own first token, as if it
were decoded alone. Rows at different positions complete and start groups at different steps, so
those steps select keys by the row's position (a mask over the ring) instead of by Python slicing.

`StaticHierarchicalCache` keeps the same state in fixed-shape tensors and steps without Python
branches on the position, for CUDA graphs (see its docstring); on a GPU its step is two Triton
launches (decode_kernels.py).
"""

import operator
from typing import NamedTuple

import torch

from .blocked import Partial, merge, window_partial
from .fused import triton_usable
from .geometry import effective_block_size, top_causal_level
from .interface import check_block_size, check_key_padding_mask
from .rotary import rotary_angles, rotate


def pair_sums(k_sum, v_sum, count, groups: int):
    """The next level's sums: the first 2 * groups groups of key sums (B, H, G, D), value sums and counts (B, G)
    added in pairs."""
    return (k_sum[:, :, : 2 * groups].unflatten(2, (groups, 2)).sum(3),
            v_sum[:, :, : 2 * groups].unflatten(2, (groups, 2)).sum(3),
            count[:, : 2 * groups].unflatten(1, (groups, 2)).sum(2))  # fmt: skip

class StepInputs(NamedTuple):
    """What the attention steps of every layer share at one decoded position (computed once per token)."""

    # cos and sin (D/2,) of the position's rotary angles (a position per row: (B, 1, D/2))
    rotary: tuple[torch.Tensor, torch.Tensor]
    plan: "StepPlan | None" = None  # a StaticHierarchicalCache's rows and masks (None: the step finds them)


class _Level:
    """Groups of ``2**level`` positions: the last two blocks of them, and this level's softmax state."""

    def __init__(self, batch: int, heads: int, dim_head: int, ring: int, capacity: int, dtype, device):
        self.ring = ring  # slots of two blocks; until the level has that many groups it holds `capacity`
        self.k_sum = torch.zeros(batch, heads, capacity, dim_head, dtype=dtype, device=device)
        self.v_sum = torch.zeros_like(self.k_sum)
        self.count = torch.zeros(batch, capacity, dtype=dtype, device=device)  # valid positions per group
        # level >= 1: the state of the current group's query over this level's keys, and that state
        # merged with every coarser level's (the merge order of the blocked forward: coarse to fine)
        self.partial: Partial | None = None
        self.merged: Partial | None = None

    def reserve(self, slots: int) -> None:
        """Room for `slots` slots. Levels above log2(t / block_size) hold fewer groups than the ring has
        slots (all of them together about 2 * block_size), so a level's ring grows by doubling."""
        capacity = self.count.shape[1]
        if slots <= capacity:
            return
        extra = min(self.ring, max(slots, 2 * capacity)) - capacity
        b, h, _, d = self.k_sum.shape
        self.k_sum = torch.cat([self.k_sum, self.k_sum.new_zeros(b, h, extra, d)], 2)
        self.v_sum = torch.cat([self.v_sum, self.v_sum.new_zeros(b, h, extra, d)], 2)
        self.count = torch.cat([self.count, self.count.new_zeros(b, extra)], 1)

    def tensors(self) -> list[torch.Tensor]:
        states = [s for s in (self.partial, self.merged) if s is not None]
        return [self.k_sum, self.v_sum, self.count] + [t for s in states for t in s]


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> Partial:
    """Softmax state of one (already scaled) query (B, H, D) over keys/values (B, Hkv, K, D) with counts (B, K);
    query head h meets kv head h // (H / Hkv) (grouped-query attention, by broadcasting).

    A key standing for `count` positions enters with weight ``count * exp(score)``; a count of 0 (padding,
    an empty group, a slot not written yet) gives log(0) = -inf: no key.
    """
    b, h, d = query.shape
    hkv = keys.shape[1]
    bias = torch.log(count)[:, None, None, None, :]  # (B, 1, 1, 1, K)
    # the group's query heads as the rows of one block: (B, Hkv, G, 1, D) against (B, Hkv, 1, K, D)
    state = window_partial(query.view(b, hkv, h // hkv, 1, d), keys[:, :, None], values[:, :, None], bias, 0.0)
    return Partial(state.m.view(b, h, 1), state.l.view(b, h, 1), state.o.view(b, h, 1, -1))


def _rotate_qk(q: torch.Tensor, k: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, D) and k (B, Hkv, D) turned by `rotary` (cos, sin) in one rotation (heads side by side)."""
    return rotate(torch.cat((q, k), 1), *rotary).split((q.shape[1], k.shape[1]), 1)


class HierarchicalCache:
    """Decoding state of causal hierarchical attention for one layer (all heads).

    ``prefill(q, k, v, key_padding_mask)`` takes a prompt's projections, q (B, H, T, D) and k, v
    (B, Hkv, T, D) (T >= 0; Hkv dividing H: grouped-query attention, the cache holds Hkv heads), and
    ``step(q, k, v)`` the next position's (B, H|Hkv, 1, D), returning its attention output (B, H, 1, D):
    the parallel causal forward's output at that position, to float rounding. Positions are absolute
    (rotary must already be applied at them); every stepped position is a real token. Work per step
    is constant in the context length (amortised), memory grows as ``block_size * log2(t)``.

    ``prefill(q, k, v, lengths=)`` takes prompts of different lengths, right padded: row i is real on
    its first ``lengths[i]`` positions and continues at position ``lengths[i]`` of its own frame, so each
    row's outputs are those of its prompt alone (`positions` holds each row's next position; rotary
    must be applied at the row's own positions). Equal lengths take the one-position path.
    """

    def __init__(self, block_size: int, scale: float | None = None):
        check_block_size(block_size)
        self.block_size = block_size
        self.scale = scale
        self.length = 0  # positions seen: the next step is position `length`
        self.heads = None  # query heads, set by the prefill (the levels hold the kv heads)
        self.levels: list[_Level] = []
        # after a prefill, per level >= 1 with keys: the current group's coarse query, and the rows that
        # have no valid position in the group yet (their first valid position is the next step's)
        self._prompt_queries: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # prompts of different lengths: each row's next position, (B,) on the device and as a host list
        # (the step's control flow reads the list: no synchronisation); `length` is then their maximum
        self.positions: torch.Tensor | None = None
        self._rows: list[int] | None = None
        self._prompt_rows: list[int] | None = None
        self._queries: list[torch.Tensor] = []  # per level >= 1, each row's current coarse query (B, H, D)
        # what prefill takes as `lengths` when not given: the model's forward passes the prompt and its
        # mask only, so `DecodingCache` sets the lengths here before it
        self.prompt_lengths = None

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None, lengths=None
    ) -> None:
        """Fill the cache from the prompt's q (B, H, T, D), k, v (B, Hkv, T, D); `key_padding_mask` (B, T),
        True = real (the padded frame: every row continues at position T); or `lengths` (B,) ints in
        [0, T]: right-padded prompts, row i real on its first lengths[i] positions and continued from there
        in its own frame (default: `prompt_lengths`)."""
        if self.length or self.positions is not None:
            raise ValueError(f"prefill needs an empty cache, this one holds {self.length} positions")
        b, h, n, d = q.shape
        hkv = k.shape[1]
        if k.shape[1] != v.shape[1] or h % hkv:
            raise ValueError(f"q's heads ({h}) must be a multiple of k's and v's heads ({hkv}, {v.shape[1]})")
        self.heads = h
        check_key_padding_mask(key_padding_mask, b, n)
        nr = self.block_size
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = d**-0.5 if self.scale is None else self.scale
        lengths = self.prompt_lengths if lengths is None else lengths
        if lengths is not None:
            if key_padding_mask is not None:
                raise ValueError("pass either key_padding_mask or lengths, not both")
            rows = check_lengths(lengths, b, n)
            if len(set(rows)) > 1:
                return self._prefill_rows(q, k, v, rows, dtype, scale)
            n = rows[0] if rows else n  # equal lengths: the one-position cache of the prompts' real part
            q, k, v = q[:, :, :n], k[:, :, :n], v[:, :, :n]
        if key_padding_mask is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=q.device)
        else:
            valid = key_padding_mask
        # selected, not multiplied: a padded position's content (NaN, Inf) must not reach any sum
        real = valid[:, None, :, None]
        k_sum = torch.where(real, k.to(dtype), 0.0)
        v_sum = torch.where(real, v.to(dtype), 0.0)
        count = valid.to(dtype)

        # level l holds the n >> l complete groups; only the two blocks around the next position's group stay
        self.levels = []
        level = 0
        while True:
            # room for the groups there are (at least one slot); a ring grows by doubling up to two blocks,
            # so a block size far above the length costs what the length does
            capacity = min(2 * nr, max(1, count.shape[1]))
            self.levels.append(_Level(b, hkv, d, 2 * nr, capacity, dtype, q.device))
            current_block = (n >> level) // nr
            first = max(0, (current_block - 1) * nr)
            slots = torch.arange(first, count.shape[1], device=q.device) % (2 * nr)
            kept = self.levels[level]
            kept.k_sum[:, :, slots] = k_sum[:, :, first:]
            kept.v_sum[:, :, slots] = v_sum[:, :, first:]
            kept.count[:, slots] = count[:, first:]
            groups = n >> (level + 1)
            if groups == 0:
                break
            k_sum, v_sum, count = pair_sums(k_sum, v_sum, count, groups)
            level += 1

        q_scaled = q.to(dtype) * scale
        self._prompt_queries = []
        for level in range(1, top_causal_level(n, nr) + 1):
            start = (n >> level) << level  # the next position's level-l group starts here
            in_group = valid[:, start:]
            if in_group.shape[1] == 0:
                self._prompt_queries.append((q_scaled.new_zeros(b, h, d), torch.ones_like(valid[:, 0])))
                continue
            first_valid = start + in_group.to(torch.int32).argmax(1)  # argmax: the first maximum
            query = q_scaled.gather(2, first_valid[:, None, None, None].expand(b, h, 1, d))[:, :, 0]
            self._prompt_queries.append((query, ~in_group.any(1)))
        self.length = n

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend from the next position: q (B, H, 1, D), k, v (B, Hkv, 1, D) -> output (B, H, 1, D); appends
        it as a key."""
        heads = q.shape[1] if self.heads is None else self.heads
        kv_heads = self.levels[0].k_sum.shape[1] if self.levels else k.shape[1]
        if (
            q.dim() != 4 or k.dim() != 4 or q.shape != (q.shape[0], heads, 1, q.shape[-1])
            or k.shape != (q.shape[0], kv_heads, 1, q.shape[-1]) or v.shape[:3] != k.shape[:3] or heads % kv_heads
        ):
            raise ValueError(
                f"step takes q of shape (batch, heads={heads}, 1, dim_head) and k, v of shape (batch, kv_heads="
                f"{kv_heads}, 1, dim_head), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if not self.levels:
            self.prefill(q[:, :, :0], k[:, :, :0], v[:, :, :0])
        dtype = self.levels[0].k_sum.dtype
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        query = q[:, :, 0].to(dtype) * scale  # (B, H, D)
        if self.positions is not None:  # prompts of different lengths: each row at its own position
            return self._step_rows(query, k[:, :, 0].to(dtype), v[:, :, 0].to(dtype)).to(q.dtype)
        t = self.length
        self._append(k[:, :, 0].to(dtype), v[:, :, 0].to(dtype))

        top = top_causal_level(t, self.block_size)
        if self._prompt_queries is not None:  # first step after a prefill: every level's state is new
            queries = [torch.where(missing[:, None, None], query, kept) for kept, missing in self._prompt_queries]
            self._prompt_queries = None
        else:  # levels whose group starts at t (t a multiple of 2**l) have a new query; others reuse theirs
            starting = (t & -t).bit_length() - 1 if t else top
            queries = [query] * min(starting, top)
        for level in range(len(queries), 0, -1):
            kept = self.levels[level]
            kept.partial = self._coarse_partial(level, t, queries[level - 1])
            kept.merged = kept.partial if level == top else merge(self.levels[level + 1].merged, kept.partial)

        fine = self.levels[0]
        state = _attend(query, fine.k_sum, fine.v_sum, fine.count)
        if top:
            state = merge(self.levels[1].merged, state)
        self.length = t + 1
        out = state.o / state.l.clamp(min=torch.finfo(dtype).tiny)[..., None]  # (B, H, 1, D)
        return out.to(q.dtype)

    def step_inputs(self, inv_freq: torch.Tensor) -> StepInputs:
        """The rotary angles of the next position (by `inv_freq`), in the cache's precision."""
        first = self.levels[0].k_sum
        if self.positions is not None:  # each row's own position: angles (B, 1, D/2), broadcast over heads
            cos, sin = rotary_angles(self.positions, inv_freq, first.dtype)
            return StepInputs((cos[:, None], sin[:, None]))
        position = torch.full((), self.length, device=first.device)
        return StepInputs(rotary_angles(position, inv_freq, first.dtype))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """A layer's step: q (B, H, D), k, v (B, Hkv, D) of the next position, not yet turned by rotary -> output
        (B, H, D).
        The same call as `StaticHierarchicalCache.attend`."""
        q, k = _rotate_qk(q, k, inputs.rotary)
        return self.step(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]

    def _coarse_partial(self, level: int, position: int, query: torch.Tensor) -> Partial:
        nr = self.block_size
        group = position >> level
        first = ((group // nr - 1) % 2) * nr  # ring slot of the previous block
        width = nr if group % nr >= nr // 2 else nr // 2  # first-half groups: the level below covers the rest
        kept = self.levels[level]
        count = kept.count[:, first : first + width]
        denom = count.clamp(min=1.0)[:, None, :, None]
        keys = kept.k_sum[:, :, first : first + width] / denom
        values = kept.v_sum[:, :, first : first + width] / denom
        return _attend(query, keys, values, count)

    def _write(self, level: int, group: int, k_sum, v_sum, count) -> None:
        nr = self.block_size
        slot = group % (2 * nr)
        kept = self.levels[level]
        kept.reserve(slot + 1)
        if group % nr == 0:  # a new block replaces the one two blocks back; its unwritten groups are no keys
            for buffer in (kept.k_sum, kept.v_sum):
                buffer[:, :, slot : slot + nr] = 0.0
            kept.count[:, slot : slot + nr] = 0.0
        kept.k_sum[:, :, slot] = k_sum
        kept.v_sum[:, :, slot] = v_sum
        kept.count[:, slot] = count

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store position `length` as a fine key, then every coarser group it completes."""
        t = self.length
        self._write(0, t, k, v, 1.0)
        level = 1
        while (t + 1) % (1 << level) == 0:
            child = self.levels[level - 1]
            left = (2 * (t >> level)) % (2 * self.block_size)  # both children sit in one block
            k_sum = child.k_sum[:, :, left] + child.k_sum[:, :, left + 1]
            v_sum = child.v_sum[:, :, left] + child.v_sum[:, :, left + 1]
            count = child.count[:, left] + child.count[:, left + 1]
            if level == len(self.levels):
                b, h, _, d = child.k_sum.shape
                self.levels.append(_Level(b, h, d, 2 * self.block_size, 1, k_sum.dtype, k_sum.device))
            self._write(level, t >> level, k_sum, v_sum, count)
            level += 1

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache keeps (for memory accounting)."""
        kept = [t for level in self.levels for t in level.tensors()]
        if self._prompt_queries is not None:
            kept += [t for pair in self._prompt_queries for t in pair]
        if self.positions is not None:
            kept += [self.positions, *self._queries]
        return kept

    # ------------------------------------------------------------ prompts of different lengths

    def _prefill_rows(self, q, k, v, rows: list[int], dtype, scale) -> None:
        """`prefill` of right-padded prompts of the lengths `rows`: every row's levels hold the complete
        groups of its own prompt in the slots its own position gives them."""
        b, h, n, d = q.shape
        nr = self.block_size
        lengths = torch.tensor(rows, dtype=torch.int64, device=q.device)
        valid = torch.arange(n, device=q.device) < lengths[:, None]
        # selected, not multiplied: the padding's content (NaN, Inf) must not reach any sum
        k_sum = torch.where(valid[:, None, :, None], k.to(dtype), 0.0)
        v_sum = torch.where(valid[:, None, :, None], v.to(dtype), 0.0)
        count = valid.to(dtype)
        self.levels = []
        level = 0
        while True:
            groups = count.shape[1]  # n >> level
            kept = _Level(b, k.shape[1], d, 2 * nr, min(2 * nr, max(1, groups)), dtype, q.device)
            # a row keeps its complete groups from the block before its next position's block on (padding
            # and partial groups are none of them): at most one per ring slot, so a sum over the slot's
            # groups is that group
            ends = lengths >> level
            index = torch.arange(groups, device=q.device)
            keep = (index >= ((ends // nr - 1) * nr).clamp(min=0)[:, None]) & (index < ends[:, None])  # (B, groups)
            capacity = kept.count.shape[1]
            kept.k_sum = _fold_slots(torch.where(keep[:, None, :, None], k_sum, 0.0), 2, 2 * nr, capacity)
            kept.v_sum = _fold_slots(torch.where(keep[:, None, :, None], v_sum, 0.0), 2, 2 * nr, capacity)
            kept.count = _fold_slots(torch.where(keep, count, 0.0), 1, 2 * nr, capacity)
            self.levels.append(kept)
            pairs = groups // 2
            if pairs == 0:
                break
            k_sum, v_sum, count = pair_sums(k_sum, v_sum, count, pairs)
            level += 1
        # per level >= 1, the query of the first position of each row's current group (a row whose group
        # starts at its next position takes that one's, at the step)
        q_scaled = q.to(dtype) * scale
        self._queries = []
        for level in range(1, len(self.levels)):
            start = ((lengths >> level) << level).clamp(max=n - 1)
            self._queries.append(q_scaled.gather(2, start[:, None, None, None].expand(b, h, 1, d))[:, :, 0])
        self.positions, self._rows, self.length = lengths, list(rows), max(rows)
        self._prompt_rows = self._rows  # (a StaticHierarchicalCache is made before any step)

    def _step_rows(self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`step` with each row at its own position: query (B, H, D) already scaled, k, v (B, Hkv, D) in the
        cache's precision. A level's state is recomputed when any row's group there starts (the others
        recompute the same keys with their kept query); a row without keys at a level has an empty state
        there, which merges as nothing."""
        nr = self.block_size
        t = self.positions
        self._append_rows(k, v)
        top = max(top_causal_level(r, nr) for r in self._rows)
        self._queries += [torch.zeros_like(query) for _ in range(top - len(self._queries))]
        changed = False  # a level's merged state changes when its own state or a coarser one does
        for level in range(top, 0, -1):
            kept = self.levels[level]
            below = (1 << level) - 1
            if kept.partial is None or any(r & below == 0 for r in self._rows):
                starts = (t & below) == 0  # (B,) rows whose level-l group starts at their position
                self._queries[level - 1] = torch.where(starts[:, None, None], query, self._queries[level - 1])
                kept.partial = self._coarse_partial_rows(level, t, self._queries[level - 1])
                changed = True
            if changed:
                kept.merged = kept.partial if level == top else merge(self.levels[level + 1].merged, kept.partial)
        # level 0: the slots whose latest position up to t lies in blocks c - 1 and c
        fine = self.levels[0]
        slots = torch.arange(fine.count.shape[1], device=t.device)
        latest = t[:, None] - (t[:, None] - slots) % (2 * nr)
        lowest = ((t // nr - 1) * nr).clamp(min=0)
        state = _attend(query, fine.k_sum, fine.v_sum, torch.where(latest >= lowest[:, None], fine.count, 0.0))
        if top:
            state = merge(self.levels[1].merged, state)
        self.positions = t + 1
        self._rows = [r + 1 for r in self._rows]
        self.length = max(self._rows)
        return state.o / state.l.clamp(min=torch.finfo(query.dtype).tiny)[..., None]  # (B, H, 1, D)

    def _coarse_partial_rows(self, level: int, t: torch.Tensor, query: torch.Tensor) -> Partial:
        """`_coarse_partial` for each row at its position t (B,): the ring's slots masked to the row's keys."""
        nr = self.block_size
        kept = self.levels[level]
        group = t >> level
        block = group // nr
        first = ((block + 1) % 2) * nr  # ring slot of block c - 1's first group
        width = torch.where(group % nr >= nr // 2, nr, nr // 2)  # first-half groups: the level below has the rest
        width = torch.where(block >= 1, width, 0)
        offset = torch.arange(kept.count.shape[1], device=t.device) - first[:, None]
        count = torch.where((offset >= 0) & (offset < width[:, None]), kept.count, 0.0)
        denom = count.clamp(min=1.0)[:, None, :, None]
        return _attend(query, kept.k_sum / denom, kept.v_sum / denom, count)

    def _append_rows(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """`_append` for each row at its own position: the levels a row completes are written for it, the
        other rows keep their slots."""
        nr = self.block_size
        t = self.positions
        batch = torch.arange(len(self._rows), device=t.device)
        self._write_rows(0, t, self._rows, k, v, torch.ones_like(k[:, 0, 0]), None)
        level = 1
        while any((r + 1) % (1 << level) == 0 for r in self._rows):
            child = self.levels[level - 1]
            complete = ((t + 1) & ((1 << level) - 1)) == 0
            left = (2 * (t >> level)) % (2 * nr)  # both children sit in one block
            # rows that complete nothing read slot 0 (which exists), and keep their own row below
            left, right = torch.where(complete, left, 0), torch.where(complete, left + 1, 0)
            k_sum = child.k_sum[batch, :, left] + child.k_sum[batch, :, right]
            v_sum = child.v_sum[batch, :, left] + child.v_sum[batch, :, right]
            count = child.count[batch, left] + child.count[batch, right]
            if level == len(self.levels):
                b, h, _, d = child.k_sum.shape
                self.levels.append(_Level(b, h, d, 2 * nr, 1, k_sum.dtype, k_sum.device))
            self._write_rows(level, t >> level, [r >> level for r in self._rows], k_sum, v_sum, count, complete)
            level += 1

    def _write_rows(self, level: int, group, host_groups: list[int], k_sum, v_sum, count, writes) -> None:
        """Group `group` (B,) of each row (`host_groups` on the host) into its ring slot, where `writes`
        (B,) bool (None: every row). No slots are cleared: the steps pick keys by position, not count."""
        nr = self.block_size
        kept = self.levels[level]
        kept.reserve(max(g % (2 * nr) for g in host_groups) + 1)
        slot = group % (2 * nr)
        batch = torch.arange(len(host_groups), device=slot.device)
        if writes is not None:
            k_sum = torch.where(writes[:, None, None], k_sum, kept.k_sum[batch, :, slot])
            v_sum = torch.where(writes[:, None, None], v_sum, kept.v_sum[batch, :, slot])
            count = torch.where(writes, count, kept.count[batch, slot])
        kept.k_sum[batch, :, slot] = k_sum
        kept.v_sum[batch, :, slot] = v_sum
        kept.count[batch, slot] = count


def _fold_slots(x: torch.Tensor, dim: int, ring: int, capacity: int) -> torch.Tensor:
    """The groups along `dim` of x summed into ring slots ``group % ring``, the first `capacity` slots."""
    groups = x.shape[dim]
    rounds = -(-groups // ring)
    shape = list(x.shape)
    shape[dim] = rounds * ring
    padded = x.new_zeros(shape)
    padded.narrow(dim, 0, groups).copy_(x)
    return padded.unflatten(dim, (rounds, ring)).sum(dim).narrow(dim, 0, capacity).contiguous()


def check_lengths(lengths, batch: int, n: int) -> list[int]:
    """`lengths`, the real positions of each of `batch` right-padded prompt rows of `n` positions, as a
    list of ints in [0, n]."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.dim() != 1:
            raise ValueError(f"lengths must have shape (batch,) = ({batch},), got {tuple(lengths.shape)}")
        rows = lengths.tolist()
    else:
        try:
            rows = [operator.index(x) for x in lengths]
        except TypeError:
            raise TypeError(f"lengths must be a 1-D integer tensor or a sequence of ints, got {lengths!r}") from None
        if any(isinstance(x, bool) for x in lengths):
            raise TypeError(f"lengths must hold ints, not bools, got {lengths!r}")
    if len(rows) != batch:
        raise ValueError(f"lengths must have one entry per prompt row ({batch}), got {len(rows)}")
    if any(not 0 <= r <= n for r in rows):
        raise ValueError(f"lengths must lie in [0, {n}] (the prompt's positions), got {rows}")
    return rows


def check_capacity(capacity, length: int) -> int:
    """`capacity` as an int, which must exceed the `length` positions already held."""
    try:
        value = operator.index(capacity)
    except TypeError:
        value = None
    if value is None or isinstance(capacity, bool) or value <= length:
        raise ValueError(f"capacity must be an int above the prompt length {length}, got {capacity!r}")
    return value


class StepPlan(NamedTuple):
    """Rows of a `StaticHierarchicalCache` ring that one step reads and writes, and its masks (with a
    position per row, each tensor has a last dimension of size B)."""

    rows: torch.Tensor  # (levels,) the position's group per level
    sibling_rows: torch.Tensor  # (levels - 1,) the group before it, per level but the last
    complete: torch.Tensor  # (levels,) bool: the group ends at this position
    starts: torch.Tensor  # (levels,) bool: the group begins at this position
    keys: torch.Tensor  # (levels, 2 * block_size) bool: the slots that are keys of this position


class StaticHierarchicalCache:
    """The same decoding state with fixed shapes: every step is one tensor program, whatever the position.

    ``HierarchicalCache.step`` branches in Python on the position (which levels start a group, which
    groups complete, how many levels exist) and issues a few hundred small operations; on a GPU that
    is launch-bound. Here the position is a device tensor and every level up to the one that
    `capacity` positions need is always present: the slots of a level live in one ring tensor
    (levels x 2 * block_size slots x B x H x (k, v, count)), appended groups are written with
    `index_copy_` under a mask, and one softmax runs over every level's slots at once, slots that are
    no keys of the position being masked out by their count or their place. `advance` (the step
    without its host-side checks) has no host synchronisation and no shape that depends on the
    position, so it can be captured in a CUDA graph and replayed (model/cache.py, `StaticDecoder`).

    A step's work is that of ``levels * 2 * block_size`` keys, levels being those that `capacity`
    needs: logarithmic in the capacity and the same at every position, where `HierarchicalCache`
    does only the levels whose group changes (constant amortised work).

    Differences to `HierarchicalCache`, all to rounding: a completed group's sums are k plus the left
    siblings of every level below, summed in that order (the same pairs as the blocked coarsening,
    associated from the fine end); every level's softmax state is recomputed at every step instead of
    once per group; the levels are merged by one softmax instead of pairwise, coarse to fine.

    From a cache prefilled with prompts of different lengths, `position` holds each row's (B,) and every
    plan tensor has a last dimension B (rows written per row, keys masked per row); otherwise the same.

    `kernel`: step through the Triton kernels of decode_kernels.py (two launches per step instead of
    about thirty PyTorch operations). None (default): on CUDA with float32 sums; True: wherever
    Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1), float32 or float64; False: PyTorch.
    """

    def __init__(self, cache: HierarchicalCache, capacity: int, kernel: bool | None = None):
        """From a freshly prefilled (or empty) `cache`, room for positions up to `capacity - 1`.

        A block size above what `capacity` needs (``capacity <= 2 * block_size``: plain causal attention)
        is cut to `geometry.effective_block_size`, the same result in a ring sized by the capacity."""
        rows_apart = cache.positions is not None
        if cache.length and cache._prompt_queries is None and not (rows_apart and cache._rows == cache._prompt_rows):
            raise ValueError("a StaticHierarchicalCache is made from a cache right after its prefill, before any step")
        if not cache.levels:
            raise ValueError("the cache is empty: prefill it first (an empty prompt is fine)")
        capacity = check_capacity(capacity, cache.length)
        # positions below 2 * nr sit in level-0 slot `position % (2 * nr)` for either block size
        nr = self.block_size = effective_block_size(capacity, cache.block_size)
        self.scale = cache.scale
        self.capacity = capacity
        self.length = cache.length  # positions held, counted on the host (the device has `position`)
        levels = top_causal_level(capacity - 1, nr) + 1
        first = cache.levels[0]
        b, hkv, _, d = first.k_sum.shape  # the ring holds the kv heads, the queries every query head
        h = cache.heads
        dtype, device = first.k_sum.dtype, first.k_sum.device
        self.levels, self.dim_head = levels, d
        ring = torch.zeros(levels, 2 * nr, b, hkv, 2 * d + 1, dtype=dtype, device=device)
        for level, kept in enumerate(cache.levels[:levels]):
            used = kept.count.shape[1]
            ring[level, :used, :, :, :d] = kept.k_sum.permute(2, 0, 1, 3)
            ring[level, :used, :, :, d : 2 * d] = kept.v_sum.permute(2, 0, 1, 3)
            ring[level, :used, :, :, 2 * d] = kept.count.t()[:, :, None]
        self.ring = ring.flatten(0, 1)  # (levels * 2 * nr, B, Hkv, 2D + 1): level l's slot s at row l * 2nr + s
        # per level, the (scaled) query of the current group's first real position, and the rows that
        # have none yet (the next step's query is theirs); level 0's is the stepped position's own
        self.queries = torch.zeros(levels, b, h, d, dtype=dtype, device=device)
        self.missing = torch.ones(levels, b, dtype=torch.bool, device=device)
        for level, (query, missing) in enumerate(cache._prompt_queries or [], 1):
            if level < levels:
                self.queries[level] = query
                self.missing[level] = missing
        for level, query in enumerate(cache._queries if rows_apart else [], 1):  # every row has its group's query
            if level < levels:
                self.queries[level] = query
                self.missing[level] = False
        # prompts of different lengths: a position per row (B,), and every plan tensor gets a last dimension B
        position = cache.positions if rows_apart else cache.length
        self.position = torch.as_tensor(position, dtype=torch.int64, device=device).clone()
        self._level = torch.arange(levels, device=device)
        self._slot = torch.arange(2 * nr, device=device)
        self._batch = torch.arange(b, device=device)
        self._kernel_step = self._choose_kernel(kernel)
        self.kernel = self._kernel_step is not None

    def _choose_kernel(self, kernel: bool | None):
        """decode_kernels.static_step where the step goes through the Triton kernels, else None."""
        if kernel is not None and not isinstance(kernel, bool):
            raise TypeError(f"kernel must be True, False or None, got {kernel!r}")
        if kernel is False:
            return None
        usable = triton_usable(self.ring)
        if usable:
            from . import decode_kernels

            usable = decode_kernels.supports(self.ring, self.dim_head)
        if kernel and not usable:
            raise ValueError(
                "kernel=True needs triton and a state on CUDA (or TRITON_INTERPRET=1 on the CPU), with float32 or "
                f"float64 sums and dim_head <= 256; this one is {self.ring.dtype} on {self.ring.device}, "
                f"dim_head {self.dim_head}"
            )
        if kernel is None:
            usable = usable and self.ring.is_cuda and self.ring.dtype == torch.float32
        return decode_kernels.static_step if usable else None

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache keeps; a step changes them in place."""
        return [self.ring, self.queries, self.missing, self.position]

    def plan(self) -> StepPlan:
        """Where the step at `self.position` reads and writes: the same for every layer of a model
        (equal block size and capacity, equal position), so a decoder computes it once per token."""
        nr = self.block_size
        t, lv, slot = self.position, self._level, self._slot
        if t.dim():  # a position per row: (levels, B) where one position has (levels,), (2nr, B) for (2nr,)
            lv, slot = lv[:, None], slot[:, None]
        group = t >> lv  # (levels,) the position's group per level
        base = lv * (2 * nr)
        below = (1 << lv) - 1
        # keys per level: level 0 the fine positions of blocks c - 1 and c up to t; level l >= 1 the
        # groups of block c - 1 (its first half when the group sits in the first half of block c)
        block = group // nr  # c per level
        start = ((block + 1) * nr) % (2 * nr)  # ring slot of block c - 1's first group (operands >= 0 throughout)
        width = torch.where(group % nr >= nr // 2, nr, nr // 2)
        width = torch.where(block >= 1, width, 0)
        coarse = (slot[None] - start[:, None] + 2 * nr) % (2 * nr) < width[:, None]  # (levels, 2nr)
        fine_position = t - (t - slot + 2 * nr) % (2 * nr)  # the latest position <= t in each level-0 slot
        fine = fine_position >= ((block[0] - 1) * nr).clamp(min=0)
        return StepPlan(
            rows=base + group % (2 * nr),
            sibling_rows=base[:-1] + (group[:-1] + 2 * nr - 1) % (2 * nr),
            complete=((t + 1) & below) == 0,  # level l's group completes at t: (t + 1) % 2**l == 0
            starts=(t & below) == 0,  # level l's group starts at t: t % 2**l == 0
            keys=torch.cat([fine[None], coarse[1:]]),
        )

    def step_inputs(self, inv_freq: torch.Tensor) -> StepInputs:
        """The rotary angles of the position being decoded (by `inv_freq`) and, for the PyTorch step, its
        plan: the same for every layer of a model, so a decoder makes them once per token."""
        rotary = rotary_angles(self.position, inv_freq, self.ring.dtype)
        if self.position.dim():  # a position per row: (B, 1, D/2), broadcast over the heads
            rotary = tuple(x[:, None] for x in rotary)
        return StepInputs(rotary, None if self.kernel else self.plan())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """A layer's step: `advance` with the shared `inputs` (q and k not yet turned by rotary)."""
        return self.advance(q, k, v, inputs.plan, inputs.rotary)

    def step(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan | None = None, rotary=None
    ) -> torch.Tensor:
        """Attend from position `self.position`: q (B, H, D), k, v (B, Hkv, D) -> output (B, H, D); appends it
        as a key and advances the position. `plan`: `self.plan()` (made here when None); `rotary`: see `advance`.

        Checks the inputs and counts the steps against `capacity` on the host, then `advance`."""
        shape = self.queries.shape[1:]
        kv_shape = (*self.ring.shape[1:3], shape[-1])
        if q.shape != shape or k.shape != kv_shape or v.shape != kv_shape:
            raise ValueError(
                f"step takes q of shape (batch, heads, dim_head) = {tuple(shape)} and k, v of shape (batch, kv_heads, "
                f"dim_head) = {kv_shape}, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        angles = (shape[-1] // 2,) if not self.position.dim() else (shape[0], 1, shape[-1] // 2)
        if rotary is not None and (shape[-1] % 2 or any(tuple(x.shape) != angles for x in rotary)):
            raise ValueError(
                f"rotary takes cos and sin of shape {'(dim_head / 2,)' if len(angles) == 1 else '(B, 1, dim_head / 2)'}"
                f" = {angles}, got {[tuple(x.shape) for x in rotary]}"
            )
        if self.length >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions (its capacity), all used")
        self.length += 1
        return self.advance(q, k, v, plan, rotary)

    def advance(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan | None = None, rotary=None
    ) -> torch.Tensor:
        """`step` without checks or the host-side count: only tensor operations on device, which a CUDA
        graph or torch.compile can take whole. The caller keeps the position below `capacity`
        (`StaticDecoder` counts its steps); past it, the output is wrong without an error.

        `rotary`: (cos, sin) of the position's rotary angles, each (D/2,) (`rotary.rotary_angles`): q and
        k come unturned and are turned here (by the Triton kernel as it loads them, which saves the
        separate rotation's kernels), else they come turned already."""
        if self.kernel:  # the same step in two Triton launches (`plan` is not needed)
            return self._kernel_step(self, q, k, v, rotary)
        if rotary is not None:
            q, k = _rotate_qk(q, k, rotary)
        nr, d, levels = self.block_size, self.dim_head, self.levels
        dtype = self.ring.dtype
        scale = d**-0.5 if self.scale is None else self.scale
        if plan is None:
            plan = self.plan()

        # append: a completed level-l group's sums are k plus the left sibling at every level below (all
        # of them complete at t too); other levels keep their row
        new = torch.cat([k.to(dtype), v.to(dtype), torch.ones_like(k[..., :1], dtype=dtype)], -1)  # (B, Hkv, 2D+1)
        if self.position.dim():  # a position per row: each row's rows of the ring, plan tensors (..., B)
            sums = torch.cat([new[None], self.ring[plan.sibling_rows, self._batch]]).cumsum(0)
            kept = self.ring[plan.rows, self._batch]
            self.ring[plan.rows, self._batch] = torch.where(plan.complete[..., None, None], sums, kept)
            starts, keys = plan.starts, plan.keys[..., None]
        else:  # sums (levels, B, Hkv, 2D + 1)
            sums = torch.cat([new[None], self.ring.index_select(0, plan.sibling_rows)]).cumsum(0)
            kept = self.ring.index_select(0, plan.rows)
            self.ring.index_copy_(0, plan.rows, torch.where(plan.complete[:, None, None, None], sums, kept))
            starts, keys = plan.starts[:, None], plan.keys[:, :, None, None]

        # queries: a level whose group starts at t, or a row without one yet, takes q
        query = q.to(dtype) * scale
        take = starts | self.missing  # (levels, B)
        self.queries.copy_(torch.where(take[..., None, None], query[None], self.queries))
        self.missing.fill_(False)

        # one softmax over every level's keys; a slot that is no key of t has weight count * 0 = 0
        ring = self.ring.view(levels, 2 * nr, *self.ring.shape[1:])
        count = ring[..., 2 * d] * keys  # (levels, 2nr, B, Hkv)
        denom = count.clamp(min=1.0)[..., None]
        keys, values = ring[..., :d] / denom, ring[..., d : 2 * d] / denom
        b, hkv = ring.shape[2:4]
        # the G = H / Hkv query heads of each kv head: (levels, B, Hkv, G, D)
        queries = self.queries.view(levels, b, hkv, -1, d)
        scores = torch.einsum("lbkgd,lsbkd->bkgls", queries, keys)
        # selected: a slot that is no key gets -inf whatever its stale score (+inf - inf would be NaN)
        count = count.permute(2, 3, 0, 1)[:, :, None]  # (B, Hkv, 1, levels, 2nr)
        scores = torch.where(count > 0, scores + torch.log(count), -torch.inf)
        weights = torch.softmax(scores.flatten(3), -1)  # (B, Hkv, G, levels * 2nr)
        out = torch.einsum("bkgx,xbkd->bkgd", weights, values.flatten(0, 1)).flatten(1, 2)  # (B, H, D)
        self.position.add_(1)
        return out.to(q.dtype)
