"""Next-token training loss and sampling for a causal HTransformer1D."""

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of predicting x[:, 1:] from x[:, :-1]; padded targets are ignored."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"x must have shape (batch, seq_len >= 2), got {getattr(x, 'shape', type(x))}")
        inp, target = x[:, :-1], x[:, 1:]
        if mask is not None:
            self.net.check_tokens(x)
            target = target.masked_fill(~mask[:, 1:], self.ignore_index)
            mask = mask[:, :-1]
        logits = self.net(inp, mask=mask)  # (B, N-1, V)
        return F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.ignore_index)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        seq_len: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token: int | None = None,
    ) -> torch.Tensor:
        """Continue `prompt` (B, T) or (T,) by `seq_len` tokens; returns only the new tokens.

        After a sequence emits `eos_token`, its remaining positions hold `pad_value`; generation
        stops early once every sequence has emitted it. The model sees at most the last
        `max_seq_len` tokens.
        """
        check_sampling(seq_len, temperature, top_k, top_p)
        if not isinstance(prompt, torch.Tensor) or prompt.dim() not in (1, 2) or prompt.shape[-1] < 1:
            raise ValueError("prompt must be a non-empty tensor of token ids of shape (T,) or (batch, T)")
        squeeze = prompt.dim() == 1
        tokens = prompt[None] if squeeze else prompt
        was_training = self.net.training
        self.net.eval()
        b, t = tokens.shape
        out = torch.full((b, seq_len), self.pad_value, dtype=tokens.dtype, device=tokens.device)
        done = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        try:
            for step in range(seq_len):
                logits = self.net(tokens[:, -self.max_seq_len :])[:, -1]  # (B, V)
                nxt = sample_next(logits, temperature, top_k, top_p)
                nxt = nxt.masked_fill(done, self.pad_value)
                out[:, step] = nxt
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                if eos_token is not None:
                    done |= nxt == eos_token
                    if bool(done.all()):
                        break
        finally:
            self.net.train(was_training)
        return out[0] if squeeze else out
