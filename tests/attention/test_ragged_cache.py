"""The decoding caches with prompts of different lengths (``HierarchicalCache.prefill(lengths=)``, then
eager steps or a StaticHierarchicalCache in PyTorch or its Triton step, the interpreter on the CPU):
every row, decoded at its own position, against the dense definition on that row alone."""

import pytest
import torch

from h_transformer_1d.attention import h_attention
from h_transformer_1d.attention.incremental import HierarchicalCache, StaticHierarchicalCache
from h_transformer_1d.attention.rotary import apply_rotary, rotary_angles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton step: compiled, or interpreted on the CPU


def ragged_lengths(block_size: int) -> list[int]:
    return [1, 3, block_size - 1, block_size + 1, 13, 0]


def step_rows(cache, q, k, v, lengths, steps, rotary_freqs=None):
    """Each step's output (B, H, 1, D) per row, stepping row i from position lengths[i] on (its own q, k, v
    there: `lengths[i] + step`); with `rotary_freqs`, q and k come unturned and go through `attend`."""
    rows = torch.arange(len(lengths))
    outs = []
    for step in range(steps):
        at = torch.tensor(lengths) + step
        q_t, k_t, v_t = (x[rows, :, at] for x in (q, k, v))  # (B, H, D)
        if isinstance(cache, StaticHierarchicalCache):
            inputs = cache.step_inputs(rotary_freqs) if rotary_freqs is not None else None
            outs.append(cache.step(q_t, k_t, v_t, rotary=inputs and inputs.rotary)[:, :, None])
        elif rotary_freqs is None:
            outs.append(cache.step(q_t[:, :, None], k_t[:, :, None], v_t[:, :, None]))
        else:
            outs.append(cache.attend(q_t, k_t, v_t, cache.step_inputs(rotary_freqs))[:, :, None])
    return outs


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_rows_match_the_reference_alone(block_size, kv_heads):
    """Lengths around a block, one empty prompt; 70 steps cross levels 1 to 4 (block 4) or 3 (block 8)."""
    lengths, steps = ragged_lengths(block_size), 70
    b, h, d, t = len(lengths), 2, 8, max(lengths)
    n = t + steps
    q = torch.randn(b, h, n, d, dtype=torch.float64)
    k, v = (torch.randn(b, kv_heads, n, d, dtype=torch.float64) for _ in range(2))
    cache = HierarchicalCache(block_size)
    cache.prefill(q[:, :, :t], k[:, :, :t], v[:, :, :t], lengths=lengths)
    assert cache.positions.tolist() == lengths and cache.length == t
    outs = step_rows(cache, q, k, v, lengths, steps)
    assert cache.positions.tolist() == [length + steps for length in lengths]
    for row, length in enumerate(lengths):
        alone = (x[row : row + 1, :, : length + steps] for x in (q, k, v))
        ref = h_attention(*alone, block_size=block_size, causal=True, impl="reference")
        for step, out in enumerate(outs):
            at = length + step
            torch.testing.assert_close(out[row : row + 1], ref[:, :, at : at + 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("block_size", [4, 8])
def test_static_rows_match_the_reference_alone(block_size):
    """The fixed-shape cache made from the prefill, in PyTorch: a position per row on the device."""
    lengths, steps = ragged_lengths(block_size), 50
    b, h, d, t = len(lengths), 2, 8, max(lengths)
    n = t + steps
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    cache = HierarchicalCache(block_size)
    cache.prefill(q[:, :, :t], k[:, :, :t], v[:, :, :t], lengths=lengths)
    static = StaticHierarchicalCache(cache, capacity=n, kernel=False)
    outs = step_rows(static, q, k, v, lengths, steps)
    assert static.position.tolist() == [length + steps for length in lengths] and static.length == n
    for row, length in enumerate(lengths):
        alone = (x[row : row + 1, :, : length + steps] for x in (q, k, v))
        ref = h_attention(*alone, block_size=block_size, causal=True, impl="reference")
        got = torch.cat([out[row : row + 1] for out in outs], 2)
        torch.testing.assert_close(got, ref[:, :, length:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["eager", "static", "kernel"])
def test_rows_turn_by_their_own_rotary_positions(kind):
    """Each row's q and k are turned at the row's own position (from 0 at its first token): the eager
    `attend`, the static step and the Triton step (which turns them as it loads them); grouped-query."""
    if kind == "kernel":
        pytest.importorskip("triton")
    lengths, block_size = [2, 9, 5], 4
    steps = 10 if kind == "kernel" else 30  # up to level 2 (the interpreter is slow)
    b, h, d, t = len(lengths), 2, 8, max(lengths)
    n = t + steps
    q = torch.randn(b, h, n, d, dtype=torch.float64, device=DEVICE)
    k, v = (torch.randn(b, 1, n, d, dtype=torch.float64, device=DEVICE) for _ in range(2))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=DEVICE) / d)
    positions = torch.arange(n, device=DEVICE)
    q_turned, k_turned = apply_rotary(q, positions, inv_freq), apply_rotary(k, positions, inv_freq)
    cache = HierarchicalCache(block_size)
    cache.prefill(q_turned[:, :, :t], k_turned[:, :, :t], v[:, :, :t], lengths=lengths)
    if kind != "eager":
        cache = StaticHierarchicalCache(cache, capacity=n, kernel=kind == "kernel")
    cos, _ = cache.step_inputs(inv_freq).rotary
    torch.testing.assert_close(cos[:, 0], rotary_angles(torch.tensor(lengths, device=DEVICE), inv_freq, q.dtype)[0])
    outs = step_rows(cache, q, k, v, lengths, steps, rotary_freqs=inv_freq)
    for row, length in enumerate(lengths):
        alone = (x[row : row + 1, :, : length + steps] for x in (q_turned, k_turned, v))
        ref = h_attention(*alone, block_size=block_size, causal=True, impl="reference")
        got = torch.cat([out[row : row + 1] for out in outs], 2)
        torch.testing.assert_close(got, ref[:, :, length:], rtol=0, atol=1e-12)


def test_padding_content_reaches_nothing():
    lengths, steps = [3, 11, 6], 25
    b, h, d, t = len(lengths), 2, 4, max(lengths)
    q, k, v = (torch.randn(b, h, t + steps, d, dtype=torch.float64) for _ in range(3))
    outs = []
    for fill in (None, float("nan")):
        prompt = [x[:, :, :t].clone() for x in (q, k, v)]
        if fill is not None:
            padding = torch.arange(t) >= torch.tensor(lengths)[:, None]  # (B, T)
            for x in prompt:
                x.masked_fill_(padding[:, None, :, None], fill)
        cache = HierarchicalCache(4)
        cache.prefill(*prompt, lengths=lengths)
        outs.append(torch.cat(step_rows(cache, q, k, v, lengths, steps), 2))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_equal_lengths_take_the_one_position_path():
    """Equal lengths below the prompt's width: the cache of the prompts' real part, stepped identically."""
    b, h, d, t, length, steps = 2, 2, 4, 12, 9, 20
    q, k, v = (torch.randn(b, h, length + steps, d, dtype=torch.float64) for _ in range(3))
    padded = [torch.cat([x[:, :, :length], torch.randn(b, h, t - length, d, dtype=x.dtype)], 2) for x in (q, k, v)]
    cache, plain = HierarchicalCache(4), HierarchicalCache(4)
    cache.prefill(*padded, lengths=torch.tensor([length, length]))
    plain.prefill(q[:, :, :length], k[:, :, :length], v[:, :, :length])
    assert cache.positions is None and cache.length == length
    for at in range(length, length + steps):
        x = (q[:, :, at : at + 1], k[:, :, at : at + 1], v[:, :, at : at + 1])
        assert torch.equal(cache.step(*x), plain.step(*x))


def test_lengths_are_checked():
    b, h, t, d = 3, 2, 6, 4
    q, k, v = (torch.randn(b, h, t, d) for _ in range(3))
    bad = [
        ([1, 2], ValueError, "one entry per prompt row"),
        ([1, 2, 7], ValueError, r"lengths must lie in \[0, 6\]"),
        ([1, -1, 2], ValueError, "lengths must lie"),
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, "lengths must hold integers"),
        (torch.ones(3, 1, dtype=torch.long), ValueError, r"lengths must have shape \(batch,\)"),
        ([True, 2, 3], TypeError, "not bools"),
        (["1", 2, 3], TypeError, "lengths must be"),
    ]
    for lengths, error, message in bad:
        with pytest.raises(error, match=message):
            HierarchicalCache(4).prefill(q, k, v, lengths=lengths)
    with pytest.raises(ValueError, match="either key_padding_mask or lengths"):
        HierarchicalCache(4).prefill(q, k, v, key_padding_mask=torch.ones(b, t, dtype=torch.bool), lengths=[1, 2, 3])
    cache = HierarchicalCache(4)
    cache.prefill(q, k, v, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        cache.prefill(q, k, v, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="capacity must be an int above the prompt length 3"):
        StaticHierarchicalCache(cache, capacity=3)
    static = StaticHierarchicalCache(cache, capacity=20)
    x = torch.randn(b, h, d)
    with pytest.raises(ValueError, match=r"rotary takes cos and sin of shape \(B, 1, dim_head / 2\) = \(3, 1, 2\)"):
        static.step(x, x, x, rotary=(torch.ones(d // 2), torch.ones(d // 2)))
    cache.step(*(torch.randn(b, h, 1, d) for _ in range(3)))
    with pytest.raises(ValueError, match="right after its prefill"):
        StaticHierarchicalCache(cache, capacity=20)
