"""Incremental decoding of a causal HTransformer1D: a cache per model, one state per sublayer.

`prefill` runs the parallel forward on a prompt and fills the cache on the way; `decode_step` then
feeds one token per sequence through every layer (`HTransformer1D.step`) at a cost that does not grow
with the context (docs/design.md, decoding). The logits equal the full forward's on the whole sequence,
to float rounding. `StaticDecoder` runs the same step on a fixed-shape copy of the cache, captured once
in a CUDA graph.
"""

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..attention.incremental import (
    HierarchicalCache,
    StaticHierarchicalCache,
    StepInputs,
    check_capacity,
    check_lengths,
)
from .layers import HAttention1D


@dataclass
class SublayerCache:
    """What one pre-norm sublayer keeps of the past while decoding."""

    attention: HierarchicalCache | StaticHierarchicalCache | None = None  # attention sublayers only
    previous: torch.Tensor | None = None  # (B, dim) normed features of the last position (token shift)
    lengths: torch.Tensor | None = None  # (B,) prompts of different lengths: each row's real positions

    def keep_last(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Keep the prompt's normed features x (B, N, dim) at its last position (each row's last real one
        with `lengths`; zeros where `mask` marks it padding), which token shift moves into the first
        decoded position. A copy, so the prompt's features are not kept alive."""
        if self.lengths is not None:
            self.previous = x[torch.arange(x.shape[0], device=x.device), self.lengths - 1]  # (indexing copies)
            return
        last = x[:, -1] if mask is None else x[:, -1].masked_fill(~mask[:, -1, None], 0.0)
        self.previous = last.clone()

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
    """Per block of `model`, the (attention, feedforward) `SublayerCache`s; empty until a prefill.

    `lengths` (B,) int tensor: the prompt to come is right padded, row i real on its first lengths[i]
    tokens, and each row continues from its own last token (`prefill`'s `lengths`)."""

    def __init__(self, model: nn.Module, lengths: torch.Tensor | None = None):
        if not supports_decoding_cache(model):
            raise ValueError("a DecodingCache needs HTransformer1D(..., causal=True) with attention='hierarchical'")
        self.blocks = [
            (SublayerCache(HierarchicalCache(block.f.fn.block_size), lengths=lengths), SublayerCache(lengths=lengths))
            for block in model.layers.blocks
        ]
        for attention, _ in self.blocks:
            attention.attention.prompt_lengths = lengths

    @property
    def length(self) -> int:
        """Positions seen so far, padding included: the next token's position (with prompts of different
        lengths, the largest row's; `positions` has each row's)."""
        return self.blocks[0][0].attention.length

    @property
    def positions(self) -> torch.Tensor | None:
        """Prompts of different lengths: each row's next position (B,); None while every row is at `length`.
        (A `StaticDecoder`'s copy: the device position, counted by its steps, or None.)"""
        attention = self.blocks[0][0].attention
        if isinstance(attention, StaticHierarchicalCache):
            return attention.position if attention.position.dim() else None
        return attention.positions

    def step_inputs(self, inv_freq: torch.Tensor) -> StepInputs:
        """What every layer's step of the next token shares (`HTransformer1D.step` makes it once per token)."""
        return self.blocks[0][0].attention.step_inputs(inv_freq)

    def stored_tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.blocks for sublayer in pair for t in sublayer.stored_tensors()]


def prefill(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None = None, lengths=None):
    """Logits (B, T, num_tokens) of the prompt `tokens` (B, T) and the cache to continue it from.

    `mask` (B, T) bool marks real tokens in the padded frame: every row continues at position T.
    `lengths` (B,) ints in [1, T] instead: right-padded prompts, row i real on its first lengths[i]
    tokens and continued from there as if alone (rotary positions and hierarchy from its own first token);
    its logits at positions >= lengths[i] are of the padding."""
    if lengths is None:
        cache = DecodingCache(model)
        return model(tokens, mask=mask, cache=cache), cache
    if mask is not None:
        raise ValueError("pass either mask or lengths, not both")
    model.check_tokens(tokens)
    rows = check_lengths(lengths, *tokens.shape)
    if min(rows, default=1) < 1:
        raise ValueError(f"lengths must be at least 1 (every row needs a real token), got {rows}")
    cache = DecodingCache(model, torch.tensor(rows, dtype=torch.int64, device=tokens.device))
    return model(tokens, cache=cache), cache


def decode_step(model: nn.Module, cache: DecodingCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per sequence, `tokens` (B,), at position `cache.length` (each row's own position
    after a prefill with `lengths`: `cache.positions`); its logits (B, num_tokens)."""
    if cache.length == 0:
        raise ValueError("decode_step needs a cache filled by prefill")
    return model(tokens[:, None], cache=cache)[:, 0]  # checks the tokens, then `model.step`


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def compiled_steps_refused(model: nn.Module) -> str | None:
    """Why `StaticDecoder(model, ..., compile=True)` would be refused (before any work), or None."""
    if not supports_decoding_cache(model):
        return "compiled steps decode from the hierarchical cache: they need a causal hierarchical model"
    if model.token_emb.weight.device.type == "cpu" and torch_version() < (2, 13):
        return (
            "compile=True on the CPU needs torch >= 2.13: inductor's CPU code for this step gave wrong logits"
            f" with torch 2.11 (this is {torch.__version__}); use compile=False, or decode_step on the CPU"
        )
    return None


def _fixed_shape_copy(cache: DecodingCache, capacity: int, kernel: bool | None) -> DecodingCache:
    """A copy of the freshly prefilled `cache` in fixed shapes: a `StaticHierarchicalCache` per attention
    layer (room for positions up to `capacity - 1`) and copies of the token-shift features, which a step
    updates in place. Its `length` stays the prompt's: `StaticDecoder` counts the steps."""
    static = copy.copy(cache)
    static.blocks = [
        tuple(
            SublayerCache(
                attention=None if s.attention is None else StaticHierarchicalCache(s.attention, capacity, kernel),
                previous=None if s.previous is None else s.previous.clone(),
            )
            for s in pair
        )
        for pair in cache.blocks
    ]
    return static


class StaticDecoder:
    """Decoding steps of fixed shape after a prefill, replayed as one CUDA graph per token on GPUs.

    ``decoder = StaticDecoder(model, cache, capacity)`` takes a `DecodingCache` right after `prefill`
    (prompts of different lengths too: each row then steps from its own position, the longest row's
    counting against `capacity`) and room for positions up to ``capacity - 1``;
    ``decoder.step(tokens)`` then does what `decode_step` does, with the logits equal to float rounding. Each attention layer keeps a
    `StaticHierarchicalCache` (attention/incremental.py); the token-shift features, the position and
    the input token live in fixed buffers, so a step (the model's own `HTransformer1D.step`) is the same
    tensor program at every position.
    With `graph` (default: on CUDA) that program is captured once and each step is one graph replay:
    a GPU step costs a few microseconds of CPU instead of several hundred kernel launches from Python.
    With `compile` the step goes through `torch.compile` first (fewer, fused kernels in the graph; the
    first step pays the compilation, once per shape of the state; past torch's recompile limit the
    step falls back to the uncompiled one, with a warning). `kernel`: each attention layer's step
    through two Triton launches (`StaticHierarchicalCache`'s option; default: on CUDA in float32).

    Tokens must be integer ids in [0, num_tokens): checking their range would need a host
    synchronisation per step, so it is not done (out-of-range ids fail inside the embedding, on a GPU
    as a device-side assert). `step` returns the logits in a buffer that the next step overwrites (with
    `graph`) or in a new tensor; copy them to keep them.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: DecodingCache,
        capacity: int,
        graph: bool | None = None,
        compile: bool = False,
        kernel: bool | None = None,
    ):
        if not isinstance(cache, DecodingCache) or cache.length == 0:
            raise ValueError("StaticDecoder needs a DecodingCache filled by prefill")
        capacity = check_capacity(capacity, cache.length)
        self.model = model
        self.length = cache.length
        self.capacity = capacity
        device = model.token_emb.weight.device
        batch = cache.blocks[0][0].attention.levels[0].k_sum.shape[0]
        self.state = _fixed_shape_copy(cache, capacity, kernel)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph = device.type == "cuda" if graph is None else graph
        if self.graph and device.type != "cuda":
            raise ValueError(f"graph=True needs a model on a CUDA device, this one is on {device}")
        if compile and (refused := compiled_steps_refused(model)):
            raise ValueError(refused)
        self._graph = None
        self.logits: torch.Tensor | None = None
        # compile: the step through torch.compile (inductor fuses its small operations into few kernels),
        # then captured like the eager one
        self._run = torch.compile(self._forward, fullgraph=True, dynamic=False) if compile else self._forward

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor of decoding state (a step changes them in place)."""
        return self.state.stored_tensors()

    def _forward(self) -> torch.Tensor:
        return self.model.step(self.tokens, self.state)  # (B, num_tokens)

    def _capture(self) -> None:
        """Record the step in a CUDA graph. The warm-up runs (needed before a capture) change the state,
        so it is saved before and restored after."""
        saved = [t.clone() for t in self.stored_tensors()]
        device = self.tokens.device
        with torch.cuda.device(device):  # the model's GPU, whichever is current
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._compiled_or_eager()
            torch.cuda.current_stream(device).wait_stream(stream)
            for kept, value in zip(self.stored_tensors(), saved):
                kept.copy_(value)
            self._graph = torch.cuda.CUDAGraph()
            # a capture stream on this device: torch's default one is made on whichever device
            # captured first in the process
            with torch.cuda.graph(self._graph, stream=torch.cuda.Stream(device)):
                self.logits = self._run()

    def _compiled_or_eager(self) -> torch.Tensor:
        """One step through `self._run`; past torch.compile's recompile limit (a new shape of the state
        for each of many decoders), the uncompiled step from then on. A failed compilation runs nothing,
        so the state is untouched when the fallback runs."""
        if self._run is self._forward:
            return self._forward()
        try:
            return self._run()
        except getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ()) as error:  # the class is newer than 2.4
            warnings.warn(f"StaticDecoder: torch.compile gave up ({error}); stepping without it", stacklevel=3)
            self._run = self._forward
            return self._run()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per sequence, `tokens` (B,), at position `self.length`; its logits (B, num_tokens)."""
        if not isinstance(tokens, torch.Tensor) or tokens.shape != self.tokens.shape:
            got = getattr(tokens, "shape", tokens)
            raise ValueError(f"tokens must have shape {tuple(self.tokens.shape)}, got {got}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
        if self.length >= self.capacity:
            raise ValueError(f"the decoder holds {self.capacity} positions (its capacity), all used")
        self.tokens.copy_(tokens)
        if not self.graph:
            self.logits = self._compiled_or_eager()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        self.length += 1
        return self.logits
