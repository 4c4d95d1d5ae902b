"""Packed sequences through the model (cu_seqlens): equal to running each sequence alone."""

import pytest
import torch
from helpers import rel_err

from h_transformer_1d import AutoregressiveWrapper, CausalHAttention1D, HAttention1D, HTransformer1D

LENGTHS = [1, 3, 5, 17, 0, 11, 40, 4]  # block 4: lengths 1, block - 1, block + 1, primes, several levels


def cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0).to(torch.int32)


def tiny_model(**kw):
    args = {"num_tokens": 32, "dim": 24, "depth": 2, "max_seq_len": 64, "heads": 2, "dim_head": 8, "block_size": 4}
    args.update(kw)
    return HTransformer1D(**args).double()


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "kw",
    [
        {"causal": False, "shift_tokens": True},
        {"causal": True, "shift_tokens": True},
        {"causal": True, "shift_tokens": True, "reversible": True},
        {"causal": False, "attention": "dense", "shift_tokens": True},
        {"causal": True, "heads": 4, "kv_heads": 2},  # grouped-query layers: q and kv split from one projection
        {"causal": False, "attention": "dense", "heads": 4, "kv_heads": 1},
    ],
)
def test_packed_model_equals_each_sequence_alone(kw):
    torch.manual_seed(0)
    model = tiny_model(**kw)
    tokens = torch.randint(0, 32, (sum(LENGTHS),))
    g = torch.randn(sum(LENGTHS), 32, dtype=torch.float64)

    model.zero_grad()
    packed = model(tokens, cu_seqlens=cu(LENGTHS), max_seqlen=max(LENGTHS))
    packed.backward(g)
    packed_grads = grads(model)

    model.zero_grad()
    outs, start = [], 0
    for n in LENGTHS:
        if n:
            out = model(tokens[None, start : start + n])[0]
            out.backward(g[start : start + n])
            outs.append(out.detach())
        start += n
    assert packed.shape == (sum(LENGTHS), 32)
    assert rel_err(packed, torch.cat(outs)) < 1e-12
    for a, e in zip(packed_grads, grads(model)):
        assert rel_err(a, e) < 1e-12
    assert model(tokens[None], cu_seqlens=cu(LENGTHS), max_seqlen=40).shape == (1, sum(LENGTHS), 32)


def test_token_shift_would_leak_without_the_boundaries():
    """The check above can fail: shifting across boundaries changes the result (so the packed path's
    boundary handling is what makes it equal)."""
    torch.manual_seed(1)
    model = tiny_model(causal=True, shift_tokens=True)
    tokens = torch.randint(0, 32, (20,))
    packed = model(tokens, cu_seqlens=cu([10, 10]), max_seqlen=10)
    alone = model(tokens[None, 10:])[0]
    assert rel_err(packed[10:], alone) < 1e-12
    joined = model(tokens, cu_seqlens=cu([20]), max_seqlen=20)
    assert rel_err(joined[10:], alone) > 1e-3


@pytest.mark.parametrize("reversible", [False, True])
def test_packed_loss_equals_the_loss_of_each_sequence(reversible):
    """The wrapper's packed loss: every sequence's own next-token predictions, none across a boundary; the
    mean weighs each sequence by its number of predictions."""
    torch.manual_seed(2)
    wrapper = AutoregressiveWrapper(tiny_model(causal=True, shift_tokens=True, reversible=reversible, max_seq_len=39))
    lengths = [1, 6, 2, 40, 9]  # 40 = max_seq_len + 1: 39 inputs, as an unpacked window of 40
    tokens = torch.randint(0, 32, (sum(lengths),))
    wrapper.zero_grad()
    loss = wrapper(tokens, cu_seqlens=cu(lengths), max_seqlen=40)
    loss.backward()
    packed_grads = grads(wrapper)

    wrapper.zero_grad()
    total, start, count = 0.0, 0, sum(n - 1 for n in lengths if n > 1)
    for n in lengths:
        if n > 1:
            part = wrapper(tokens[None, start : start + n]) * (n - 1) / count
            part.backward()
            total += part.item()
        start += n
    assert abs(loss.item() - total) < 1e-12
    for a, e in zip(packed_grads, grads(wrapper)):
        assert rel_err(a, e) < 1e-12


@pytest.mark.parametrize("layer_class", [HAttention1D, CausalHAttention1D])
def test_layer_takes_cu_seqlens(layer_class):
    torch.manual_seed(3)
    layer = layer_class(16, heads=2, dim_head=8, block_size=4).double()
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    out = layer(x, cu_seqlens=cu([13, 17]), max_seqlen=17)
    alone = torch.cat([layer(x[:, :13]), layer(x[:, 13:])], 1)
    assert rel_err(out, alone) < 1e-12


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, t: m(t, cu_seqlens=cu([5, 5]), max_seqlen=5, mask=torch.ones(1, 10, dtype=torch.bool)), "no mask"),
        (lambda m, t: m(t.view(2, 5), cu_seqlens=cu([5, 5]), max_seqlen=5), "shape \\(total,\\) or \\(1, total\\)"),
        (lambda m, t: m(t, cu_seqlens=cu([5, 4]), max_seqlen=5), "end at total_tokens = 10"),
        (lambda m, t: m(t, cu_seqlens=cu([5, 5]), max_seqlen=4), "max_seqlen must be at least"),
        (lambda m, t: m(torch.zeros(70, dtype=torch.long), cu_seqlens=cu([70]), max_seqlen=70), "max_seq_len=64"),
    ],
)
def test_packed_errors_name_the_argument(call, match):
    model = tiny_model(causal=True)
    with pytest.raises(ValueError, match=match):
        call(model, torch.zeros(10, dtype=torch.long))


def test_packed_loss_needs_a_prediction():
    wrapper = AutoregressiveWrapper(tiny_model(causal=True))
    with pytest.raises(ValueError, match="at least one sequence of 2 or more tokens"):
        wrapper(torch.zeros(3, dtype=torch.long), cu_seqlens=cu([1, 1, 1]), max_seqlen=1)
