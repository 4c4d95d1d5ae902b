"""Bad input raises a clear error naming the argument and what was expected."""

import pytest
import torch

from h_transformer_1d import h_attention


def qkv(*shape):
    return [torch.randn(*shape) for _ in range(3)]


def test_attention_wrong_rank():
    with pytest.raises(ValueError, match=r"q must have shape \(batch, heads, seq_len, dim_head\)"):
        h_attention(*qkv(2, 10, 8), block_size=4)


def test_attention_qkv_shape_mismatch():
    q, k, v = qkv(1, 2, 10, 8)
    with pytest.raises(ValueError, match="q, k and v must agree"):
        h_attention(q, k[:, :, :9], v, block_size=4)


def test_attention_rotary_freqs_shape():
    with pytest.raises(ValueError, match=r"rotary_freqs must have shape \(dim_head / 2,\) = \(4,\)"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, rotary_freqs=torch.ones(8))


def test_attention_rotary_freqs_type():
    with pytest.raises(TypeError, match="rotary_freqs must be a floating point torch.Tensor"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, rotary_freqs=[1.0, 2.0, 3.0, 4.0])


def test_attention_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seq_len\) = \(1, 10\)"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, key_padding_mask=torch.ones(1, 11, dtype=torch.bool))


def test_attention_mask_dtype_mismatch():
    with pytest.raises(TypeError, match="key_padding_mask must have dtype torch.bool"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, key_padding_mask=torch.ones(1, 10))


@pytest.mark.parametrize("block_size", [0, 1, 3, 12])
def test_attention_block_size_not_power_of_two(block_size):
    with pytest.raises(ValueError, match=f"block_size must be a power of two >= 2, got {block_size}"):
        h_attention(*qkv(1, 2, 10, 8), block_size=block_size)


def test_attention_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, impl="fast")


@pytest.mark.parametrize("axis,name", [(0, "batch"), (1, "heads"), (3, "dim_head")])
def test_attention_empty_batch_heads_or_dim_head(axis, name):
    shape = [2, 2, 10, 8]
    shape[axis] = 0
    with pytest.raises(ValueError, match=f"q, k and v must have {name} >= 1"):
        h_attention(*qkv(*shape), block_size=4)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_attention_scale_not_finite(scale):
    with pytest.raises(ValueError, match="scale must be a finite float or None"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5)])
def test_attention_scale_not_a_number(scale):
    with pytest.raises(TypeError, match="scale must be a finite float or None"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, scale=scale)


@pytest.mark.parametrize("causal", ["yes", 1, None])
def test_attention_causal_not_bool(causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, causal=causal)


@pytest.mark.parametrize("dropout_p", [2.0, -0.1, 1.0, float("nan")])
def test_attention_dropout_out_of_range(dropout_p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, dropout_p=dropout_p)


def test_attention_dropout_not_a_number():
    with pytest.raises(TypeError, match=r"dropout_p must be a float in \[0, 1\)"):
        h_attention(*qkv(1, 2, 10, 8), block_size=4, dropout_p="0.1")


def test_attention_own_value_dim_on_the_kernels():
    """v with its own head dim runs on the blocked path and the reference; the kernels say they need one."""
    pytest.importorskip("triton")
    q, k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 32)
    with pytest.raises(ValueError, match=r"impl='triton' needs .* \(v's the same as q's\)"):
        h_attention(q, k, v, block_size=16, impl="triton")
