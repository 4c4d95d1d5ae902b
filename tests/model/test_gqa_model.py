"""The model with grouped-query attention (`kv_heads` < `heads`): the layer equals attention on keys and
values repeated per query head, gradients flow, and cached decoding (eager and fixed-shape) gives the full
forward's logits."""

import pytest
import torch

from h_transformer_1d import HTransformer1D
from h_transformer_1d.model.cache import StaticDecoder, decode_step, prefill
from h_transformer_1d.model.layers import CausalHAttention1D, HAttention1D

MODEL = {
    "num_tokens": 29,
    "dim": 32,
    "depth": 2,
    "max_seq_len": 256,
    "causal": True,
    "heads": 4,
    "dim_head": 8,
    "block_size": 4,
}


def repeated_kv_layer(layer: HAttention1D) -> HAttention1D:
    """A layer with kv_heads = heads whose projections repeat `layer`'s kv heads per query head."""
    twin = type(layer)(layer.dim, heads=layer.heads, dim_head=layer.dim_head, block_size=layer.block_size)
    twin = twin.to(layer.to_qkv.weight.dtype)
    inner, grp = layer.heads * layer.dim_head, layer.heads // layer.kv_heads
    wq, wk, wv = layer.to_qkv.weight.split([inner, inner // grp, inner // grp])
    repeat = [
        w.unflatten(0, (layer.kv_heads, layer.dim_head)).repeat_interleave(grp, 0).flatten(0, 1) for w in (wk, wv)
    ]
    with torch.no_grad():
        twin.to_qkv.weight.copy_(torch.cat([wq, *repeat]))
        twin.to_out.load_state_dict(layer.to_out.state_dict())
    return twin


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("layer_class", [HAttention1D, CausalHAttention1D])
@pytest.mark.parametrize("attention", ["hierarchical", "dense"])
def test_layer_equals_repeated_kv(kv_heads, layer_class, attention):
    layer = layer_class(16, heads=4, dim_head=8, block_size=4, kv_heads=kv_heads, attention=attention).double()
    assert layer.to_qkv.weight.shape == ((4 + 2 * kv_heads) * 8, 16)
    twin = repeated_kv_layer(layer)
    twin.attention = attention
    x = torch.randn(2, 23, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 23) > 0.2
    mask[:, 0] = True
    out = layer(x, mask=mask)
    expected = twin(x, mask=mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    (ex,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(gx, ex, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_model_backward_reaches_every_weight(kv_heads):
    model = HTransformer1D(**{**MODEL, "causal": False}, kv_heads=kv_heads)
    tokens = torch.randint(0, 29, (2, 37))
    model(tokens).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("static", [False, True])
def test_decoded_logits_equal_full_forward(kv_heads, static):
    model = HTransformer1D(**MODEL, kv_heads=kv_heads, shift_tokens=True).double().eval()
    tokens = torch.randint(0, 29, (2, 70))
    with torch.no_grad():
        full = model(tokens)
        logits, cache = prefill(model, tokens[:, :9])
        assert cache.blocks[0][0].attention.levels[0].k_sum.shape[1] == kv_heads  # sized by kv heads
        if static:
            decoder = StaticDecoder(model, cache, tokens.shape[1], kernel=False)
            assert decoder.state.blocks[0][0].attention.ring.shape[2] == kv_heads
            steps = [decoder.step(tokens[:, t]).clone() for t in range(9, 70)]
        else:
            steps = [decode_step(model, cache, tokens[:, t]) for t in range(9, 70)]
    torch.testing.assert_close(torch.cat([logits, torch.stack(steps, 1)], 1), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kv_heads", [0, 3, -1, 2.0, True])
def test_kv_heads_must_divide_heads(kv_heads):
    with pytest.raises(ValueError, match="kv_heads must be None or a positive int dividing heads=4"):
        HAttention1D(16, heads=4, dim_head=8, kv_heads=kv_heads)
    with pytest.raises(ValueError, match="kv_heads must be None or a positive int dividing heads=4"):
        HTransformer1D(**MODEL, kv_heads=kv_heads)


def test_default_kv_heads_keeps_the_fused_projection():
    layer = HAttention1D(16, heads=4, dim_head=8)
    assert layer.kv_heads == 4 and layer.to_qkv.weight.shape == (3 * 32, 16)
