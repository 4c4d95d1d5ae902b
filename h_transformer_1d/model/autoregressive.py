"""Next-token training loss and sampling for a causal HTransformer1D."""

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.incremental import check_lengths
from ..attention.interface import check_key_padding_mask
from ..attention.varlen import check_cu_seqlens
from .cache import StaticDecoder, compiled_steps_refused, decode_step, prefill, supports_decoding_cache

GRAPH_MIN_TOKENS = 16  # generate(cuda_graph=None) captures a CUDA graph when asked for more tokens


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set of mass >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1)[:, 0]


def check_sampling(seq_len, temperature, top_k, top_p) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int (tokens to generate), got {seq_len!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def left_align(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (mask True) to the end of the row, in order: left padding."""
    order = mask.to(torch.int8).argsort(dim=1, stable=True)  # padding first, each kind in its order
    return tokens.gather(1, order), mask.gather(1, order)


class AutoregressiveWrapper(nn.Module):
    """``loss = wrapper(x)`` trains next-token prediction; ``wrapper.generate(prompt, n)`` samples."""

    def __init__(self, net: nn.Module, ignore_index: int = -100, pad_value: int = 0):
        super().__init__()
        if not getattr(net, "causal", False):
            raise ValueError("net must be a causal model (HTransformer1D(..., causal=True))")
        self.net = net
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.max_seq_len = net.max_seq_len

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1]; padded targets are ignored.

        Packed: x (total,) or (1, total) holds sequences back to back (`cu_seqlens`, `max_seqlen` as for
        `HTransformer1D`, each sequence at most max_seq_len + 1 tokens): the mean over every sequence's
        own next-token predictions; the last token of a sequence predicts nothing."""
        if cu_seqlens is not None:
            return self.packed_loss(x, mask, cu_seqlens, max_seqlen)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"x must have shape (batch, seq_len >= 2), got {getattr(x, 'shape', type(x))}")
        # every id, the last target included: cross_entropy would fail on it without naming it (CUDA: a device assert)
        self.net.check_tokens(x, max_len=self.max_seq_len + 1)
        x = x.long()  # cross_entropy takes int64 targets
        inp, target = x[:, :-1], x[:, 1:]
        if mask is not None:
            target = target.masked_fill(~mask[:, 1:], self.ignore_index)
            mask = mask[:, :-1]
        logits = self.net(inp, mask=mask)  # (B, N-1, V)
        return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)

    def packed_loss(self, x, mask, cu_seqlens, max_seqlen) -> torch.Tensor:
        if mask is not None:
            raise ValueError("packed sequences (cu_seqlens) take no mask")
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or (x.dim() == 2 and x.shape[0] != 1):
            raise ValueError(f"with cu_seqlens x must have shape (total,) or (1, total), got {getattr(x, 'shape', x)}")
        x = x.reshape(-1)
        self.net.check_tokens(x[None], max_len=len(x))
        lengths = torch.tensor(check_cu_seqlens(cu_seqlens, max_seqlen, len(x)))
        inputs = (lengths - 1).clamp(min=0)  # each sequence without its last token
        if not inputs.sum():
            raise ValueError("packed sequences need at least one sequence of 2 or more tokens to predict")
        # positions in the stream, on the host: the inputs leave out each sequence's last token, the
        # targets its first
        ends = lengths.cumsum(0)
        last = torch.zeros(len(x), dtype=torch.bool)
        last[ends[lengths > 0] - 1] = True
        first = torch.zeros(len(x), dtype=torch.bool)
        first[(ends - lengths)[lengths > 0]] = True
        index = torch.cat([(~last).nonzero()[:, 0], (~first).nonzero()[:, 0]]).to(x.device)
        inp, target = x.index_select(0, index).long().split(int(inputs.sum()))
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), inputs.cumsum(0).to(torch.int32)])
        logits = self.net(inp, cu_seqlens=cu, max_seqlen=int(inputs.max()))  # (T, V)
        return F.cross_entropy(logits, target)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor | list[torch.Tensor],
        seq_len: int,
        *,
        use_cache: bool = True,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token: int | None = None,
        mask: torch.Tensor | None = None,
        lengths=None,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> torch.Tensor:
        """Continue `prompt` (B, T) or (T,) by `seq_len` tokens; returns only the new tokens.

        The model sees the prompt's last `max_seq_len` tokens. With `use_cache` it then decodes one
        token at a time from a hierarchical cache, at a cost per token that does not grow with the
        context, and may run past `max_seq_len` with the whole context in view (hierarchical attention
        and rotary positions have no length limit); models with attention="dense" always recompute.
        `use_cache=False` recomputes the forward over the last `max_seq_len` tokens for every token.
        On CUDA the cached steps run as one CUDA graph replay per token (`StaticDecoder`): a step costs
        a few microseconds of CPU instead of hundreds of kernel launches. `cuda_graph=False` steps
        eagerly (same tokens; logits equal to float rounding); the default (None) uses the graph for
        CUDA prompts when more than `GRAPH_MIN_TOKENS` tokens are asked for (the capture costs about
        as much as a few eager steps: two warm-up steps and the recording). `compile=True` sends the
        cached steps through `torch.compile` first (`StaticDecoder(compile=True)`: fewer, fused kernels,
        a faster step on a GPU, benchmarks/results/decode_cuda/), at the price of a compilation of seconds to
        a minute for each new shape of the decoding state (set by the batch, the prompt length and
        `seq_len`; later calls with the same ones reuse it): for long continuations. On the CPU it needs
        torch >= 2.13.

        `mask` (B, T) or (T,) bool marks the real prompt tokens (True). Each row's real tokens are
        moved to the end of the row, in order (right padding becomes left padding), so that every
        continuation directly follows its own last real token; both paths then compute the model on
        that left-padded sequence (the padded frame: padding counts as positions). Temperature 0 is
        greedy. After a sequence emits `eos_token`, its remaining positions hold `pad_value`; generation
        stops once every sequence has emitted it.

        Prompts of different lengths without padding: `prompt` a list of B 1-D token tensors, or a
        right-padded (B, T) batch with `lengths` (B,) (row i real on its first lengths[i] tokens). Each
        row is then continued exactly as it would be alone (its own positions from 0; the cache keeps
        a position per row, also in the CUDA graph steps); returns (B, seq_len).
        """
        check_sampling(seq_len, temperature, top_k, top_p)
        if isinstance(prompt, (list, tuple)) or lengths is not None:
            rows = self.prompt_rows(prompt, lengths, mask)
            if len({len(row) for row in rows}) > 1:
                return self.generate_rows(rows, seq_len, use_cache, (temperature, top_k, top_p), eos_token,
                                          cuda_graph, compile)
            prompt = torch.stack(rows)  # one length: the usual path, unpadded
        if not isinstance(prompt, torch.Tensor) or prompt.dim() not in (1, 2) or prompt.shape[-1] < 1:
            raise ValueError("prompt must be a non-empty tensor of token ids of shape (T,) or (batch, T)")
        squeeze = prompt.dim() == 1
        tokens = prompt[None] if squeeze else prompt
        b, t = tokens.shape
        if mask is not None:
            if squeeze and isinstance(mask, torch.Tensor):
                mask = mask[None]
            check_key_padding_mask(mask, b, t, name="mask")
            if not bool(mask.any(1).all()):
                raise ValueError("mask must mark at least one real token (True) in every prompt row")
            tokens, mask = left_align(tokens, mask)
            mask = None if bool(mask[:, -self.max_seq_len :].all()) else mask[:, -self.max_seq_len :]
        tokens = tokens[:, -self.max_seq_len :]
        cached = use_cache and supports_decoding_cache(self.net)
        graph = self.check_decoder_options(seq_len, cached, tokens.device, use_cache, cuda_graph, compile)
        was_training = self.net.training
        self.net.eval()
        try:
            if cached:
                logits, cache = prefill(self.net, tokens, mask)
                advance = self.cached_steps(cache, tokens.shape[1] + seq_len, graph, compile)
            else:
                logits = self.net(tokens, mask=mask)

                def advance(nxt):
                    nonlocal tokens, mask
                    tokens = torch.cat([tokens, nxt[:, None]], dim=1)[:, -self.max_seq_len :]
                    if mask is not None:
                        mask = F.pad(mask, (0, 1), value=True)[:, -self.max_seq_len :]
                    return self.net(tokens, mask=mask)[:, -1]

            sampling = (temperature, top_k, top_p)
            out = self.sample_steps(logits[:, -1], advance, seq_len, sampling, eos_token, tokens.dtype)
        finally:
            self.net.train(was_training)
        return out[0] if squeeze else out

    def check_decoder_options(self, seq_len, cached, device, use_cache, cuda_graph, compile) -> bool:
        """Check `generate`'s `cuda_graph` and `compile` (before the prefill's work); whether the cached steps
        replay a CUDA graph."""
        if cuda_graph and not (cached and device.type == "cuda"):
            raise ValueError(
                "cuda_graph=True needs use_cache=True, a causal hierarchical model and a prompt on a CUDA device"
                f" (use_cache={use_cache}, prompt on {device})"
            )
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if compile and not use_cache:
            raise ValueError("compile=True needs use_cache=True (it compiles the cached steps)")
        if compile and (refused := compiled_steps_refused(self.net)):
            raise ValueError(refused)
        return cached and device.type == "cuda" and seq_len > GRAPH_MIN_TOKENS if cuda_graph is None else cuda_graph

    def cached_steps(self, cache, capacity: int, graph: bool, compile: bool):
        """The step from a filled decoding cache, one token per row -> the next logits (B, V): through a
        `StaticDecoder` (room for `capacity` positions) with `graph` or `compile`, else `decode_step`."""
        if graph or compile:
            return StaticDecoder(self.net, cache, capacity, graph=graph, compile=compile).step
        return lambda nxt: decode_step(self.net, cache, nxt)

    def sample_steps(self, logits, advance, seq_len: int, sampling, eos_token, dtype) -> torch.Tensor:
        """`seq_len` tokens (B, seq_len) sampled from `logits` (B, V), then from `advance(tokens)` after each
        but the last; a row that has emitted `eos_token` gets `pad_value`, and sampling stops once all have."""
        b = logits.shape[0]
        out = torch.full((b, seq_len), self.pad_value, dtype=dtype, device=logits.device)
        done = torch.zeros(b, dtype=torch.bool, device=logits.device)
        for step in range(seq_len):
            nxt = sample_next(logits, *sampling).masked_fill(done, self.pad_value).to(dtype)
            out[:, step] = nxt
            if eos_token is not None:
                done |= nxt == eos_token
                if bool(done.all()):
                    break
            if step + 1 < seq_len:
                logits = advance(nxt)
        return out

    def prompt_rows(self, prompt, lengths, mask) -> list[torch.Tensor]:
        """The real tokens of each prompt row (`generate`'s list, or its right-padded batch with `lengths`),
        each cut to its last `max_seq_len`."""
        if mask is not None:
            raise ValueError("pass either mask (the padded frame) or lengths / a list of prompts, not both")
        if isinstance(prompt, (list, tuple)):
            if lengths is not None:
                raise ValueError("a list of prompts takes no lengths (each prompt's is its own)")
            if not prompt or any(not isinstance(row, torch.Tensor) or row.dim() != 1 or not len(row) for row in prompt):
                raise ValueError("prompt as a list must hold one or more non-empty 1-D tensors of token ids")
            if len({row.device for row in prompt}) > 1:
                raise ValueError(f"the prompts must be on one device, got {sorted({str(r.device) for r in prompt})}")
            rows = list(prompt)
        else:
            if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
                got = getattr(prompt, "shape", prompt)
                raise ValueError(f"with lengths, prompt must be a (batch, T) tensor, got {got}")
            counts = check_lengths(lengths, *prompt.shape)
            if min(counts) < 1:
                raise ValueError(f"lengths must be at least 1 (every row needs a real token), got {counts}")
            rows = [row[:count] for row, count in zip(prompt, counts)]
        return [row[-self.max_seq_len :] for row in rows]

    def generate_rows(self, rows, seq_len, use_cache, sampling, eos_token, cuda_graph, compile) -> torch.Tensor:
        """`generate` for prompts `rows` of different lengths, each continued in its own frame: a
        right-padded batch whose rows the cache decodes at their own positions, or, recomputing, each
        row's last `max_seq_len` tokens gathered into a right-padded window per token."""
        cached = use_cache and supports_decoding_cache(self.net)
        device = rows[0].device
        graph = self.check_decoder_options(seq_len, cached, device, use_cache, cuda_graph, compile)
        counts = [len(row) for row in rows]
        # every token so far, right padded: row i's first lengths[i] entries
        history = rows[0].new_zeros(len(rows), max(counts) + seq_len)
        for i, row in enumerate(rows):
            history[i, : len(row)] = row
        lengths = torch.tensor(counts, device=device)
        was_training = self.net.training
        self.net.eval()
        try:
            if cached:
                logits, cache = prefill(self.net, history[:, : max(counts)], lengths=lengths)
                logits = logits[torch.arange(len(rows), device=device), lengths - 1]
                advance = self.cached_steps(cache, max(counts) + seq_len, graph, compile)
            else:
                logits = self.window_logits(history, lengths, max(counts))

                def advance(nxt):
                    nonlocal lengths
                    history[torch.arange(len(rows), device=device), lengths] = nxt
                    lengths = lengths + 1
                    return self.window_logits(history, lengths, int(lengths.max()))

            return self.sample_steps(logits, advance, seq_len, sampling, eos_token, history.dtype)
        finally:
            self.net.train(was_training)

    def window_logits(self, history: torch.Tensor, lengths: torch.Tensor, longest: int) -> torch.Tensor:
        """The next-token logits (B, V) of each row of the right-padded `history` (row i real on its first
        lengths[i] tokens, the longest `longest`) from its last `max_seq_len` tokens alone: the rows'
        windows gathered right padded (causal: what follows a row's end does not reach it)."""
        start = (lengths - self.max_seq_len).clamp(min=0)
        offsets = torch.arange(min(longest, self.max_seq_len), device=history.device)
        index = torch.minimum(start[:, None] + offsets, (lengths - 1)[:, None])  # padding: repeats the last token
        logits = self.net(history.gather(1, index))
        return logits[torch.arange(len(lengths), device=history.device), lengths - start - 1]
