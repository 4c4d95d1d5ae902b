"""Reversible residual layers (RevNet): activation memory that does not grow with depth.

Two streams run through each layer: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``. The forward keeps only
the last layer's output; the backward reconstructs each layer's input from its output and recomputes
f and g with the same random state (so dropout masks repeat).
"""

import torch
from torch import nn


class _RNGState:
    """The CPU and current-CUDA random state at one moment, restorable for a recompute."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def run(self, fn, *args, **kwargs):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            return fn(*args, **kwargs)


class ReversibleBlock(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1, x2, mask=None, cache=None):
        """The plain (memory-hungry) computation, also used to check the reversible one and to prefill
        a decoding cache (`cache`: the block's empty (f, g) sublayer caches)."""
        f_cache, g_cache = (None, None) if cache is None else cache
        y1 = x1 + self.f(x2, mask=mask, cache=f_cache)
        y2 = x2 + self.g(y1, mask=mask, cache=g_cache)
        return y1, y2

    def step(self, x1, x2, cache, inputs):
        """One position of both streams (B, dim) through the block's filled (f, g) sublayer caches."""
        f_cache, g_cache = cache
        y1 = x1 + self.f.step(x2, f_cache, inputs)
        y2 = x2 + self.g.step(y1, g_cache, inputs)
        return y1, y2

    def forward_no_grad(self, x1, x2, mask):
        self.f_rng = _RNGState(x1.device)
        y1 = x1 + self.f(x2, mask=mask)
        self.g_rng = _RNGState(x1.device)
        y2 = x2 + self.g(y1, mask=mask)
        return y1, y2

    def backward_pass(self, y1, y2, dy1, dy2, mask):
        """From outputs and their gradients, the inputs and their gradients; parameter grads accumulate."""
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            gy1 = self.g_rng.run(self.g, y1, mask=mask)
            torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + y1.grad
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            fx2 = self.f_rng.run(self.f, x2, mask=mask)
            torch.autograd.backward(fx2, dx1)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + x2.grad
        return x1.detach(), x2.detach(), dx1, dx2


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, x2, blocks, mask):
        with torch.no_grad():
            for block in blocks:
                x1, x2 = block.forward_no_grad(x1, x2, mask)
        ctx.blocks, ctx.mask = blocks, mask
        # autocast is thread-local and off where the autograd engine runs the backward: the layers
        # recomputed there must run at the precision of this forward (as torch.utils.checkpoint does)
        device = x1.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for block in reversed(ctx.blocks):
                y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2, ctx.mask)
        return dy1, dy2, None, None


class ReversibleSequence(nn.Module):
    """(B, N, dim) -> (B, N, dim): x enters both streams; the output is the mean of the two."""

    def __init__(self, blocks: list[ReversibleBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """`cache`: per block, the empty (f, g) sublayer caches of a `DecodingCache`, filled here."""
        # a prefill takes the plain path: the reversible backward would run f and g (and fill the cache) twice
        if torch.is_grad_enabled() and cache is None:
            if not x.requires_grad:  # the layers' parameters still need the backward to run
                x = x.detach().requires_grad_()
            y1, y2 = _ReversibleFunction.apply(x, x, list(self.blocks), mask)
        else:
            y1, y2 = x, x
            for i, block in enumerate(self.blocks):
                y1, y2 = block(y1, y2, mask=mask, cache=None if cache is None else cache[i])
        return (y1 + y2) / 2

    def step(self, x: torch.Tensor, cache, inputs) -> torch.Tensor:
        """One position x (B, dim) through the filled sublayer caches `cache` (see `HAttention1D.step`)."""
        y1, y2 = x, x
        for block, block_cache in zip(self.blocks, cache):
            y1, y2 = block.step(y1, y2, block_cache, inputs)
        return (y1 + y2) / 2
