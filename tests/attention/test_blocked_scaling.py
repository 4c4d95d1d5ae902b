"""The chunked blocked path (no dropout): chunk and head-group boundaries, saved state, numerics."""

import functools

import pytest
import torch
from helpers import make_mask, rel_err

from h_transformer_1d import h_attention
from h_transformer_1d.attention import blocked, hierarchical_attention_reference


def forward_backward(fn, q, k, v, grad_out, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@functools.cache
def chunking_case(n: int, mask_kind: str, causal: bool):
    """Inputs and the reference's output and gradients, shared by the chunk and group settings."""
    gen = torch.Generator().manual_seed(n + causal)
    b, h, d, nr = 2, 3, 16, 16
    # non-contiguous inputs, as the attention layers pass them
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, generator=gen).transpose(1, 2) for _ in range(3))
    mask = make_mask(mask_kind, b, n, gen)
    grad_out = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen)
    kw = {"block_size": nr, "causal": causal, "key_padding_mask": mask}
    return (q, k, v, grad_out), kw, forward_backward(hierarchical_attention_reference, q, k, v, grad_out, **kw)


@pytest.mark.parametrize("chunk_elements,group_bytes", [(1, 1), (3 * 16 * 16 * 2, 1), (1 << 12, 1 << 13)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,mask_kind", [(256, "none"), (203, "gaps"), (300, "end")])
def test_chunks_and_head_groups_match_reference(monkeypatch, chunk_elements, group_bytes, causal, n, mask_kind):
    # one block per chunk, a few blocks per chunk, or several heads per group with chunks spanning heads
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS_CPU", chunk_elements)
    monkeypatch.setattr(blocked, "GROUP_BYTES", group_bytes)
    inputs, kw, expected = chunking_case(n, mask_kind, causal)
    got = forward_backward(h_attention, *inputs, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert rel_err(a, e) <= 1e-10, name


@pytest.mark.parametrize("causal", [False, True])
def test_scores_far_below_the_row_max_stay_exact(causal):
    # weights that underflow (scores hundreds below the row max) and masked keys go through exp2
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 500, 16, dtype=torch.float64, generator=gen) for _ in range(3))
    q, k = q * 30, k * 30
    grad_out = torch.randn(1, 2, 500, 16, dtype=torch.float64, generator=gen)
    kw = {"block_size": 16, "causal": causal}
    expected = forward_backward(hierarchical_attention_reference, q, k, v, grad_out, **kw)
    got = forward_backward(h_attention, q, k, v, grad_out, **kw)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert rel_err(a, e) <= 1e-10, name
    # float32 with weights down to exp(-100) and below: finite, and as close as float32 scores allow
    q, k = q / 5, k / 5
    expected = hierarchical_attention_reference(q, k, v, **kw)
    out32 = h_attention(q.float(), k.float(), v.float(), **kw)
    assert torch.isfinite(out32).all() and rel_err(out32, expected) <= 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_backward_keeps_no_scores(causal):
    """Saved for backward: inputs, output and per-row numbers; nothing of the size of the scores."""
    n, nr, d = 4096, 16, 8
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = h_attention(q, k, v, block_size=nr, causal=causal)
    assert sum(saved) <= 4 * q.numel() + 2 * n  # q, k, v, output, mask; the level-0 scores alone are 3 * nr * n * 2
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_repeated_backward_through_one_graph():
    q = torch.randn(1, 2, 200, 16, dtype=torch.float64, requires_grad=True)
    out = h_attention(q, q * 1.5, q * 2.0, block_size=8, causal=True)
    grads = []
    for _ in range(2):
        out[:, :, 37].sum().backward(retain_graph=True)
        grads.append(q.grad)
        q.grad = None
    assert torch.equal(*grads)


def test_dropout_takes_the_autograd_path():
    q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
    torch.manual_seed(0)
    out = h_attention(q, k, v, block_size=8, dropout_p=0.5)
    out.sum().backward()
    assert out.grad_fn is not None and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    without = h_attention(q, k, v, block_size=8)
    assert rel_err(out, without) > 1e-3  # dropout did act
