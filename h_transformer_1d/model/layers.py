"""Building blocks of the model: rotary positions, token shift, hierarchical attention layers."""

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import h_attention, h_attention_qkv
from ..attention.incremental import HierarchicalCache, StaticHierarchicalCache, StepInputs
from ..attention.interface import check_block_size, check_key_padding_mask, check_probability
from ..attention.rotary import apply_rotary
from ..attention.varlen import VarlenLayout, varlen_layout


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), applied to queries and keys only."""

    def __init__(self, dim_head: int, theta: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"dim_head must be even for rotary positions, got {dim_head}")
        inv_freq = theta ** (-torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (..., N, D) by `positions` (N,), or x (B, H, N, D) by `positions` (B, N)."""
        return apply_rotary(x, positions, self.inv_freq)


class _Shift(torch.autograd.Function):
    """Each of x's feature slices `bounds[i]:bounds[i+1]` moved `amounts[i]` positions along the sequence
    (+1: from the previous position, -1: from the next, 0: kept), zeros where nothing comes in.

    One autograd node of three copies, where padding, slicing and concatenating the slices take four
    nodes and an extra pass over the features in each direction (the base model does this 24 times a
    step). The backward is the same move with the amounts negated."""

    generate_vmap_rule = True  # torch.func (vmap, grad, jacrev) goes through it, as through the plain ops

    @staticmethod
    def forward(x, bounds, amounts):
        return _move(x, bounds, amounts, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bounds, ctx.amounts = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return _move(grad, ctx.bounds, ctx.amounts, -1), None, None


def _move(x: torch.Tensor, bounds, amounts, sign: int) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.shape[1]
    for lo, hi, amount in zip(bounds[:-1], bounds[1:], amounts):
        amount *= sign
        if amount == 0:
            out[..., lo:hi].copy_(x[..., lo:hi])
        elif n <= abs(amount):
            out[..., lo:hi].zero_()
        elif amount > 0:
            out[:, amount:, lo:hi].copy_(x[:, :-amount, lo:hi])
            out[:, :amount, lo:hi].zero_()
        else:
            out[:, :amount, lo:hi].copy_(x[:, -amount:, lo:hi])
            out[:, amount:, lo:hi].zero_()
    return out


def _shifted(x: torch.Tensor, bounds, amounts) -> torch.Tensor:
    """What _Shift computes, as padding, slicing and concatenation (for torch.compile, which fuses these
    into their neighbours where the copies of _Shift would stay separate kernels, benchmarks/results/cuda_graphs/)."""
    n = x.shape[1]
    moved = []
    for lo, hi, amount in zip(bounds[:-1], bounds[1:], amounts):
        chunk = x[..., lo:hi]
        if amount > 0:
            chunk = F.pad(chunk, (0, 0, amount, 0))[:, :n]
        elif amount < 0:
            chunk = F.pad(chunk, (0, 0, 0, -amount))[:, -amount:]
        moved.append(chunk)
    return torch.cat(moved, dim=-1)


def shift_tokens(
    x: torch.Tensor, mask: torch.Tensor | VarlenLayout | None, causal: bool, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """Move a slice of the features one position along the sequence.

    Causal: half the features come from the previous position. Non-causal: a third from the previous
    position, a third from the next. Padded positions contribute zeros, so padding never leaks.
    `mask` a `VarlenLayout`: x (1, total, dim) holds sequences back to back, and nothing is shifted across
    their boundaries (zeros come in at each sequence's first position, and, non-causal, its last).
    `previous` (B, dim), causal only: the (masked) features of the position before x[:, 0], when x
    continues a sequence during decoding; zeros when None.
    """
    if previous is not None and not causal:
        raise ValueError("previous features can only be shifted in causally")
    layout = mask if isinstance(mask, VarlenLayout) else None
    if layout is not None:
        mask = None
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 0.0)
    amounts = (1, 0) if causal else (1, -1, 0)
    dim = x.shape[-1]  # the slices of x.tensor_split(len(amounts), dim=-1)
    bounds = tuple(i * (dim // len(amounts)) + min(i, dim % len(amounts)) for i in range(len(amounts) + 1))
    if previous is None:  # plain ops under the compiler, which fuses them into their neighbours
        out = _shifted(x, bounds, amounts) if torch.compiler.is_compiling() else _Shift.apply(x, bounds, amounts)
        return out if layout is None else out.masked_fill(crossing(layout, bounds, x.device), 0.0)
    # decoding: x continues a sequence whose last (masked) features are `previous`
    head = torch.cat([previous[:, None, : bounds[1]], x[:, :-1, : bounds[1]]], dim=1)
    return torch.cat([head, x[..., bounds[1] :]], dim=-1)


def crossing(layout: VarlenLayout, bounds, device) -> torch.Tensor:
    """(total, dim) bool: the shifted features that came across a sequence boundary of `layout` (the slice
    from the previous position at each first token, the slice from the next at each last one)."""
    first, last = layout.boundaries()
    feature = torch.arange(bounds[-1], device=device)
    out = first[:, None] & (feature < bounds[1])
    if len(bounds) > 3:  # non-causal: the second slice came from the next position
        out |= last[:, None] & (feature >= bounds[1]) & (feature < bounds[2])
    return out


def check_features(x, dim: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, seq_len, dim={dim}), got rank {x.dim()}")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must have last dimension dim={dim}, got shape {tuple(x.shape)}")


ATTENTION_KINDS = ("hierarchical", "dense")


def check_kv_heads(kv_heads, heads: int) -> int:
    """`kv_heads` as an int: None means `heads`; else an int >= 1 dividing `heads`."""
    if kv_heads is None:
        return heads
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"kv_heads must be None or a positive int dividing heads={heads}, got {kv_heads!r}")
    return kv_heads


def dense_attention(q, k, v, *, causal: bool, key_padding_mask, dropout_p: float) -> torch.Tensor:
    """Exact softmax attention through SDPA, with the same masking conventions as `h_attention` (k, v may
    have fewer heads than q: grouped-query attention)."""
    n = q.shape[2]
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, **gqa)
    allowed = key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # a query with no key (a padded query before the first real token) attends to itself, then is zeroed
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, **gqa)
    return out.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


class HAttention1D(nn.Module):
    """Multi-head self-attention with its projections: (B, N, dim) -> (B, N, dim).

    `attention="hierarchical"` (the point of this package) or `"dense"` (exact softmax attention via
    SDPA, for baselines inside the same model). `kv_heads`: heads of the keys and values, dividing
    `heads` (grouped-query attention; 1: multi-query); None: `heads`. The projection `to_qkv` makes
    the queries, then the keys and values, ``(heads + 2 * kv_heads) * dim_head`` features.
    """

    causal = False

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        block_size: int = 128,
        dropout: float = 0.0,
        max_seq_len: int | None = None,
        attention: str = "hierarchical",
        kv_heads: int | None = None,
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.attention = attention
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kv_heads = check_kv_heads(kv_heads, heads)
        check_block_size(block_size)
        check_probability(dropout, "dropout")
        self.dim, self.heads, self.dim_head, self.block_size = dim, heads, dim_head, block_size
        self.kv_heads = kv_heads
        self.dropout = dropout
        self.max_seq_len = max_seq_len
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner + 2 * kv_heads * dim_head, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.rotary = RotaryEmbedding(dim_head)

    def packed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> the projection's output as (B, N, 3, H, dim_head), without rotary (kv_heads = heads)."""
        return self.to_qkv(x).unflatten(-1, (3, self.heads, self.dim_head))

    def split_qkv(self, x: torch.Tensor):
        """(..., dim) -> q (..., H, dim_head), k and v (..., kv_heads, dim_head): views of the projection's
        output, without rotary."""
        return self.split_projection(self.to_qkv(x))

    def split_projection(self, proj: torch.Tensor):
        """The projection's output (..., (H + 2 kv_heads) dim_head) as q (..., H, dim_head), k, v (..., kv_heads,
        dim_head) views."""
        sizes = (self.heads * self.dim_head, self.kv_heads * self.dim_head, self.kv_heads * self.dim_head)
        return (t.unflatten(-1, (-1, self.dim_head)) for t in proj.split(sizes, -1))

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """(B, N, dim) -> q (B, H, N, dim_head), k, v (B, kv_heads, N, dim_head), rotary applied to q and k at
        `positions`."""
        if self.kv_heads == self.heads:
            return self.rotated_qkv(self.packed_qkv(x), positions)
        q, k, v = (t.transpose(1, 2) for t in self.split_qkv(x))
        return self.rotary(q, positions), self.rotary(k, positions), v

    def rotated_qkv(self, qkv: torch.Tensor, positions: torch.Tensor):
        """(B, N, 3, H, dim_head) -> q, k, v each (B, H, N, dim_head), rotary applied to q and k at `positions`."""
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k = self.rotary(qkv[:2], positions).unbind(0)  # q and k in one rotation (positions (N,))
        return q, k, qkv[2]

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | VarlenLayout | None = None,
        cache: HierarchicalCache | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """`cache` (causal hierarchical layers only): an empty one is filled from x, the prompt; a filled
        one takes x (B, 1, dim), the next position, with mask None (decoded tokens are real).

        Packed sequences: x (1, total, dim) holds them back to back, `cu_seqlens` and `max_seqlen` as for
        `h_attention_varlen` (or `mask` their `VarlenLayout`, made once for all the layers of a model);
        each attends only within itself, with rotary positions from 0 at its start."""
        check_features(x, self.dim)
        b, n, _ = x.shape
        if cu_seqlens is not None:
            if mask is not None:
                raise ValueError("pass either mask or cu_seqlens, not both")
            mask = varlen_layout(cu_seqlens, max_seqlen, self.block_size, n, x.device)
        if isinstance(mask, VarlenLayout):
            if cache is not None or b != 1 or mask.total != n:
                raise ValueError(
                    f"packed sequences need x of shape (1, total_tokens={mask.total}, dim) and no cache, got "
                    f"shape {tuple(x.shape)}{' and a cache' if cache is not None else ''}"
                )
            return self.forward_packed(x, mask)
        if cache is not None:
            if not self.causal or self.attention != "hierarchical":
                raise ValueError("a decoding cache needs a causal layer with attention='hierarchical'")
            if cache.length:
                if n != 1 or mask is not None:
                    raise ValueError(
                        f"with a filled cache x must be one position (batch, 1, dim={self.dim}) and mask None, "
                        f"got shape {tuple(x.shape)} and mask {'None' if mask is None else tuple(mask.shape)}"
                    )
                return self.step(x[:, 0], cache, cache.step_inputs(self.rotary.inv_freq))[:, None]
        if self.max_seq_len is not None and n > self.max_seq_len:
            raise ValueError(f"x has seq_len {n}, more than max_seq_len={self.max_seq_len}")
        check_key_padding_mask(mask, b, n, name="mask")
        dropout_p = self.dropout if self.training else 0.0
        if self.attention == "dense" or cache is not None:  # rotated here (the cache keeps rotated q, k)
            q, k, v = self.project_qkv(x, torch.arange(n, device=x.device))
            if self.attention == "dense":
                out = dense_attention(q, k, v, causal=self.causal, key_padding_mask=mask, dropout_p=dropout_p)
            else:
                out = h_attention(
                    q, k, v, block_size=self.block_size, causal=self.causal, key_padding_mask=mask, dropout_p=dropout_p
                )
                cache.prefill(q, k, v, key_padding_mask=mask)
        else:  # rotary inside h_attention: the Triton kernels rotate on the fly
            kw = {"block_size": self.block_size, "causal": self.causal, "key_padding_mask": mask,
                  "dropout_p": dropout_p, "rotary_freqs": self.rotary.inv_freq}
            if self.kv_heads == self.heads:
                out = h_attention_qkv(self.packed_qkv(x), **kw)  # (B, H, N, dim_head)
            else:
                out = h_attention(*(t.transpose(1, 2) for t in self.split_qkv(x)), **kw)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def forward_packed(self, x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
        """x (1, total, dim) of the packed sequences of `layout` -> (1, total, dim): attention on the padded
        buckets of similar lengths, one gather in and one out (attention/varlen.py)."""
        dropout_p = self.dropout if self.training else 0.0

        def attend(proj, mask):  # proj (b, L, features): the projection, each row one sequence from position 0
            kw = {"causal": self.causal, "key_padding_mask": mask, "dropout_p": dropout_p}
            if self.attention == "dense":
                q, k, v = (t.transpose(1, 2) for t in self.split_projection(proj))
                positions = torch.arange(proj.shape[1], device=proj.device)
                out = dense_attention(self.rotary(q, positions), self.rotary(k, positions), v, **kw)
            elif self.kv_heads == self.heads:
                qkv = proj.unflatten(-1, (3, self.heads, self.dim_head))
                out = h_attention_qkv(qkv, block_size=self.block_size, rotary_freqs=self.rotary.inv_freq, **kw)
            else:
                q, k, v = (t.transpose(1, 2) for t in self.split_projection(proj))
                out = h_attention(q, k, v, block_size=self.block_size, rotary_freqs=self.rotary.inv_freq, **kw)
            return out.transpose(1, 2)  # (b, L, H, dim_head)

        out = layout.apply(attend, self.to_qkv(x[0]))  # (total, H, dim_head)
        return self.to_out(out.flatten(1))[None]

    def step(
        self, x: torch.Tensor, cache: HierarchicalCache | StaticHierarchicalCache, inputs: StepInputs
    ) -> torch.Tensor:
        """The next position's features x (B, dim) through a filled decoding cache -> (B, dim). `inputs`: the
        position's rotary angles (and plan), `cache.step_inputs(self.rotary.inv_freq)`, shared by the layers.
        The decoders' one step: eager (`decode_step`) and fixed-shape (`StaticDecoder`) alike."""
        q, k, v = self.split_qkv(x)  # (B, H, dim_head), k and v (B, kv_heads, dim_head), not yet turned by rotary
        out = cache.attend(q, k, v, inputs)  # (B, H, dim_head)
        return self.to_out(out.flatten(1))


class CausalHAttention1D(HAttention1D):
    """Decoder variant: position i attends to positions <= i only (sampled coarse queries)."""

    causal = True


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        check_probability(dropout, "dropout")
        self.net = nn.Sequential(
            nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """LayerNorm, then optionally token shift, then the wrapped layer."""

    def __init__(self, dim: int, fn: nn.Module, shift: bool = False, causal: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn
        self.shift = shift
        self.causal = causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """`cache`: this sublayer's empty `SublayerCache` (model/cache.py), filled here from the prompt x.
        `mask`: (B, N) bool, or the `VarlenLayout` of packed sequences in x (1, total, dim)."""
        x = self.norm(x)
        if self.shift:
            if cache is not None:  # the last position's features, shifted into the first decoded one
                cache.keep_last(x, mask)
            x = shift_tokens(x, mask, self.causal)
        if cache is not None and cache.attention is not None:
            return self.fn(x, mask=mask, cache=cache.attention)
        return self.fn(x, mask=mask)

    def step(self, x: torch.Tensor, cache, inputs: StepInputs) -> torch.Tensor:
        """The next position's features x (B, dim) -> (B, dim), through this sublayer's filled `SublayerCache`:
        token shift from the features it keeps (updated in place), the attention step from its attention
        cache. `inputs`: see `HAttention1D.step`."""
        x = self.norm(x)
        if self.shift:
            shifted = shift_tokens(x[:, None], None, self.causal, previous=cache.previous)[:, 0]
            cache.previous.copy_(x)
            x = shifted
        if cache.attention is not None:
            return self.fn.step(x, cache.attention, inputs)
        return self.fn(x)
