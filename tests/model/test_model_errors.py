"""Bad input to the layers, the model and the wrapper raises a clear error naming the argument and what was expected."""

import pytest
import torch

from h_transformer_1d import AutoregressiveWrapper, HAttention1D, HTransformer1D


def model(**kw):
    args = {"num_tokens": 20, "dim": 16, "depth": 1, "max_seq_len": 64, "heads": 2, "dim_head": 8, "block_size": 4}
    return HTransformer1D(**{**args, **kw})


def test_layer_input_dim_must_equal_heads_projection_dim():
    layer = HAttention1D(16, heads=2, dim_head=8, block_size=4)
    with pytest.raises(ValueError, match=r"x must have last dimension dim=16"):
        layer(torch.randn(1, 10, 24))


def test_layer_odd_dim_head_for_rotary():
    with pytest.raises(ValueError, match="dim_head must be even"):
        HAttention1D(16, heads=2, dim_head=7)


def test_model_block_size_not_power_of_two():
    with pytest.raises(ValueError, match="block_size must be a power of two >= 2, got 6"):
        model(block_size=6)


def test_model_wrong_rank():
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq_len\), got rank 1"):
        model()(torch.randint(0, 20, (10,)))


def test_model_length_over_max_seq_len():
    with pytest.raises(ValueError, match="x has seq_len 65, more than max_seq_len=64"):
        model()(torch.randint(0, 20, (1, 65)))


def test_model_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq_len\) = \(2, 10\), got \(2, 9\)"):
        model()(torch.randint(0, 20, (2, 10)), mask=torch.ones(2, 9, dtype=torch.bool))


def test_model_mask_dtype_mismatch():
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        model()(torch.randint(0, 20, (2, 10)), mask=torch.ones(2, 10, dtype=torch.long))


@pytest.mark.parametrize("bad", [-1, 20])
def test_model_token_ids_out_of_range(bad):
    x = torch.randint(0, 20, (1, 10))
    x[0, 3] = bad
    with pytest.raises(ValueError, match=r"x must hold token ids in \[0, num_tokens=20\)"):
        model()(x)


def test_model_float_tokens():
    with pytest.raises(TypeError, match="x must hold integer token ids"):
        model()(torch.rand(1, 10))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_model_takes_any_integer_token_dtype(dtype):
    """Integer ids of any dtype are ids (nn.Embedding itself takes only int32 and int64)."""
    net = model(causal=True).eval()
    x = torch.randint(0, 20, (2, 10))
    assert torch.equal(net(x.to(dtype)), net(x))
    assert torch.equal(AutoregressiveWrapper(net)(x.to(dtype)), AutoregressiveWrapper(net)(x))


@pytest.mark.parametrize("masked", [False, True])
def test_wrapper_checks_the_last_target(masked):
    """The last target is no input of the model: it is checked too (not an IndexError in cross_entropy)."""
    wrapper = AutoregressiveWrapper(model(causal=True))
    x = torch.randint(0, 20, (2, 11))
    x[1, -1] = 20
    mask = torch.ones(2, 11, dtype=torch.bool) if masked else None
    with pytest.raises(ValueError, match=r"x must hold token ids in \[0, num_tokens=20\), got \[\d+, 20\]"):
        wrapper(x, mask=mask)


@pytest.mark.parametrize("name", ["attn_dropout", "ff_dropout"])
@pytest.mark.parametrize("value", [2.0, -0.5, 1.0])
def test_model_dropout_out_of_range(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\), got {value}"):
        model(**{name: value})


def test_layer_dropout_out_of_range():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 2.0"):
        HAttention1D(16, heads=2, dim_head=8, block_size=4, dropout=2.0)


def test_model_bad_constructor_argument():
    with pytest.raises(ValueError, match="depth must be a positive int"):
        model(depth=0)


def test_wrapper_needs_causal_model():
    with pytest.raises(ValueError, match="net must be a causal model"):
        AutoregressiveWrapper(model())


def test_generate_bad_arguments():
    wrapper = AutoregressiveWrapper(model(causal=True))
    prompt = torch.randint(0, 20, (1, 4))
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        wrapper.generate(prompt, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        wrapper.generate(prompt, 2, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        wrapper.generate(prompt, 2, top_p=1.5)


def test_model_block_size_far_above_length():
    """A block size of 2**30 with 16 positions runs as plain attention, at its cost, and decodes."""
    from h_transformer_1d.model.cache import decode_step, prefill

    net = model(causal=True, block_size=1 << 30, max_seq_len=16).eval()
    x = torch.randint(0, 20, (2, 12))
    logits = net(x)
    prompt_logits, cache = prefill(net, x[:, :8])
    steps = [decode_step(net, cache, x[:, t]) for t in range(8, 12)]
    assert torch.allclose(torch.cat([prompt_logits, torch.stack(steps, 1)], 1), logits, atol=1e-4)
