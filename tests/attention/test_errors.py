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
