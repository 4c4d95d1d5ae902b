"""HTransformer1D: token embedding, a stack of hierarchical-attention layers, logits."""

import torch
from torch import nn

from ..attention.interface import check_block_size, check_key_padding_mask, check_probability
from ..attention.varlen import VarlenLayout, check_cu_seqlens
from .layers import CausalHAttention1D, FeedForward, HAttention1D, PreNorm, check_kv_heads
from .reversible import ReversibleBlock, ReversibleSequence


def embedding_ids(x: torch.Tensor) -> torch.Tensor:
    """Integer token ids as nn.Embedding takes them: int32 and int64 as they are, other integer dtypes
    (uint8, int16, ...) as int64."""
    return x if x.dtype in (torch.int32, torch.int64) else x.long()


class SequentialSequence(nn.Module):
    """Pre-norm residual layers: x = x + f(x); x = x + g(x)."""

    def __init__(self, blocks: list[ReversibleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """`cache`: per block, the empty (attention, feedforward) sublayer caches of a `DecodingCache`."""
        for i, block in enumerate(self.blocks):
            f_cache, g_cache = (None, None) if cache is None else cache[i]
            x = x + block.f(x, mask=mask, cache=f_cache)
            x = x + block.g(x, mask=mask, cache=g_cache)
        return x

    def step(self, x: torch.Tensor, cache, inputs) -> torch.Tensor:
        """One position x (B, dim) through the filled sublayer caches `cache` (see `HAttention1D.step`)."""
        for block, (f_cache, g_cache) in zip(self.blocks, cache):
            x = x + block.f.step(x, f_cache, inputs)
            x = x + block.g.step(x, g_cache, inputs)
        return x


class HTransformer1D(nn.Module):
    """Language model / sequence encoder with hierarchical attention.

    ``model(x, mask=None)`` maps token ids (B, N), N <= max_seq_len, to logits (B, N, num_tokens).
    `mask` (B, N) bool marks real tokens (True); padded positions are never attended to.
    `attention="dense"` swaps in exact softmax attention (SDPA) for baselines of the same model.
    ``model(x, cu_seqlens=, max_seqlen=)`` runs sequences packed back to back in x (total,) or (1, total)
    (`h_attention_varlen`'s convention), each as if alone.
    `kv_heads`: heads of the keys and values in every attention layer, dividing `heads` (grouped-query
    attention; 1: multi-query; None: `heads`); the decoding cache then holds `kv_heads` heads.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        max_seq_len: int,
        causal: bool = False,
        heads: int = 8,
        dim_head: int = 64,
        block_size: int = 128,
        ff_mult: int = 4,
        reversible: bool = False,
        shift_tokens: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attention: str = "hierarchical",
        kv_heads: int | None = None,
    ):
        super().__init__()
        for name, value in (
            ("num_tokens", num_tokens),
            ("dim", dim),
            ("depth", depth),
            ("max_seq_len", max_seq_len),
            ("ff_mult", ff_mult),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_block_size(block_size)
        check_kv_heads(kv_heads, heads)
        check_probability(attn_dropout, "attn_dropout")
        check_probability(ff_dropout, "ff_dropout")
        self.num_tokens, self.dim, self.max_seq_len, self.causal = num_tokens, dim, max_seq_len, causal
        self.block_size = block_size

        attn_class = CausalHAttention1D if causal else HAttention1D
        blocks = [
            ReversibleBlock(
                PreNorm(
                    dim,
                    attn_class(
                        dim,
                        heads=heads,
                        dim_head=dim_head,
                        block_size=block_size,
                        dropout=attn_dropout,
                        attention=attention,
                        kv_heads=kv_heads,
                    ),
                    shift=shift_tokens,
                    causal=causal,
                ),
                PreNorm(dim, FeedForward(dim, ff_mult, ff_dropout), shift=shift_tokens, causal=causal),
            )
            for _ in range(depth)
        ]
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.layers = ReversibleSequence(blocks) if reversible else SequentialSequence(blocks)
        self.to_logits = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_tokens))

    def check_tokens(self, x, max_len: int | None = None) -> None:
        """x must be (B, N) integer token ids (any integer dtype) in [0, num_tokens), N <= `max_len`
        (default max_seq_len)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of token ids, got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"x must hold integer token ids (any integer dtype), got dtype {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must have shape (batch, seq_len), got rank {x.dim()} shape {tuple(x.shape)}")
        max_len = self.max_seq_len if max_len is None else max_len
        if x.shape[1] > max_len:
            raise ValueError(f"x has seq_len {x.shape[1]}, more than max_seq_len={self.max_seq_len}")
        if x.numel() and not torch.compiler.is_compiling():
            low, high = torch.stack(torch.aminmax(x)).tolist()  # one host sync for both bounds
            if low < 0 or high >= self.num_tokens:
                raise ValueError(f"x must hold token ids in [0, num_tokens={self.num_tokens}), got [{low}, {high}]")

    @property
    def rotary_freqs(self) -> torch.Tensor:
        """The inverse frequencies of the rotary positions, the same in every attention layer."""
        return self.layers.blocks[0].f.fn.rotary.inv_freq

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache=None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """`cache`: a `DecodingCache` (model/cache.py); an empty one is filled from x, a filled one takes
        the next token per sequence, x (B, 1), and may run past max_seq_len.

        Packed: x (total,) or (1, total) holds sequences back to back, `cu_seqlens` (num_seqs + 1,) int32
        their cumulative starts (on the CPU, or one copy to the host), `max_seqlen` an int at least the
        longest; every sequence at most max_seq_len. Returns logits (total, V) or (1, total, V): each
        sequence's logits as if it ran alone (attention, token shift and positions stop at its ends)."""
        if cu_seqlens is not None:
            return self.forward_packed(x, mask, cache, cu_seqlens, max_seqlen)
        self.check_tokens(x)
        x = embedding_ids(x)
        if cache is not None and cache.length:
            if x.shape[1] != 1 or mask is not None:
                raise ValueError(
                    f"with a filled cache x must be one position per sequence (batch, 1) and mask None, got "
                    f"shape {tuple(x.shape)} and mask {'None' if mask is None else tuple(mask.shape)}"
                )
            return self.step(x[:, 0], cache)[:, None]
        check_key_padding_mask(mask, x.shape[0], x.shape[1], name="mask")
        h = self.token_emb(x)  # (B, N, dim)
        h = self.layers(h, mask=mask, cache=None if cache is None else cache.blocks)
        return self.to_logits(h)  # (B, N, num_tokens)

    def forward_packed(self, x, mask, cache, cu_seqlens, max_seqlen) -> torch.Tensor:
        if mask is not None or cache is not None:
            raise ValueError("packed sequences (cu_seqlens) take no mask and no decoding cache")
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[0] != 1):
            raise ValueError(f"with cu_seqlens x must have shape (total,) or (1, total), got {getattr(x, 'shape', x)}")
        stream = x.reshape(1, -1)
        self.check_tokens(stream, max_len=stream.shape[1])
        lengths = check_cu_seqlens(cu_seqlens, max_seqlen, stream.shape[1])
        if max(lengths) > self.max_seq_len:
            raise ValueError(f"cu_seqlens holds a sequence of {max(lengths)} tokens, more than max_seq_len={self.max_seq_len}")
        layout = VarlenLayout(lengths, self.block_size, stream.device)
        h = self.token_emb(embedding_ids(stream))  # (1, total, dim)
        h = self.layers(h, mask=layout)  # the layers take the layout where a padding mask goes
        logits = self.to_logits(h)  # (1, total, num_tokens)
        return logits if x.dim() == 2 else logits[0]

    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """The next token per sequence, `tokens` (B,), through a filled decoding cache: its logits
        (B, num_tokens). `cache`: a `DecodingCache`, eager or fixed-shape (`DecodingCache.to_static`).

        The one decoding step that `decode_step` and `StaticDecoder` (which captures it in a CUDA graph)
        both run. Tokens are not checked here: a range check would synchronise with the device."""
        inputs = cache.step_inputs(self.rotary_freqs)  # made once per token, used by every layer
        h = self.token_emb(embedding_ids(tokens))  # (B, dim)
        h = self.layers.step(h, cache.blocks, inputs)
        return self.to_logits(h)  # (B, num_tokens)
