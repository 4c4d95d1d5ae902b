"""The decoding caches of causal hierarchical attention against the parallel forward, one layer at a
time: the eager cache (HierarchicalCache) and the fixed-shape one (StaticHierarchicalCache), in PyTorch
and through its Triton step (the interpreter on the CPU)."""

import math

import numpy as np
import pytest
import torch
from helpers import stored_slots_bound

from h_transformer_1d.attention import hierarchical_attention_reference
from h_transformer_1d.attention.blocked import blocked_h_attention
from h_transformer_1d.attention.incremental import HierarchicalCache, StaticHierarchicalCache
from h_transformer_1d.attention.rotary import apply_rotary, rotary_angles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton step: compiled, or interpreted on the CPU


def step_all(q, k, v, mask, prompt_len, block_size, static=False, kernel=None):
    """Outputs of positions prompt_len.. stepped after a prefill of the rest (`static`: through a
    StaticHierarchicalCache made from it, with `kernel`), and the cache."""
    cache = HierarchicalCache(block_size)
    p, n = prompt_len, q.shape[2]
    cache.prefill(q[:, :, :p], k[:, :, :p], v[:, :, :p], None if mask is None else mask[:, :p])
    if static:
        cache = StaticHierarchicalCache(cache, capacity=n, kernel=kernel)
        return torch.stack([cache.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(p, n)], 2), cache
    outs = [cache.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1]) for t in range(p, n)]
    return torch.cat(outs, 2), cache


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("prompt_len", [0, 1, 5, 37, 64])
def test_steps_match_parallel_attention(block_size, prompt_len, static):
    b, h, n, d = 2, 2, 150, 8  # positions up to level 6 of blocks of 2
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, : min(prompt_len, 3)] = False  # left padding; decoded positions are always real
    mask[0, 1 : prompt_len // 2] = False  # gaps inside the prompt
    mask[0, 0] = True
    out, _ = step_all(q, k, v, mask, prompt_len, block_size, static)
    full = blocked_h_attention(q, k, v, block_size=block_size, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out, full[:, :, prompt_len:], rtol=0, atol=1e-12)


def test_steps_match_reference_definition():
    b, h, n, d = 1, 2, 100, 8
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    out, _ = step_all(q, k, v, None, 0, 4)
    ref = hierarchical_attention_reference(q, k, v, block_size=4, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("static", [False, True])
def test_prompt_row_without_real_tokens(static):
    """A row all padding in the prompt: its coarse queries come from the first decoded position."""
    b, h, n, d, p = 2, 1, 200, 4, 70
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, :p] = False
    out, _ = step_all(q, k, v, mask, p, 4, static)
    full = blocked_h_attention(q, k, v, block_size=4, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out, full[:, :, p:], rtol=0, atol=1e-12)


def test_cache_memory_is_logarithmic():
    b, h, d, nr = 1, 2, 4, 4
    cache = HierarchicalCache(nr)
    cache.prefill(*(torch.randn(b, h, 5, d) for _ in range(3)))
    for t in range(5, 4096):
        cache.step(*(torch.randn(b, h, 1, d) for _ in range(3)))
        if t + 1 in (64, 512, 4096):
            assert len(cache.levels) == int(math.log2(t + 1)) + 1
            for level, kept in enumerate(cache.levels):
                slots = kept.count.shape[1]
                assert slots <= min(2 * nr, 2 * ((t + 1) >> level))
                assert kept.k_sum.shape == kept.v_sum.shape == (b, h, slots, d) and kept.count.shape == (b, slots)
            slots = sum(kept.count.shape[1] for kept in cache.levels)
            assert slots <= stored_slots_bound(t + 1, nr)
            softmax_states = len(cache.levels) * 2 * b * h * (d + 2)
            stored = sum(x.numel() for x in cache.stored_tensors())
            assert stored <= slots * b * (h * 2 * d + 1) + softmax_states
    assert stored < 4096 * b * h * 2 * d / 10  # a dense KV cache is 10x larger already


@pytest.mark.parametrize(
    "dtype,block_size,prompt_len,padding,d,chunk,n",
    [
        (torch.float64, 2, 0, "none", 8, 64, 30),  # an empty prompt; levels 1 to 3 appear while stepping
        (torch.float64, 4, 13, "left", 8, 4, 45),  # two chunks of ring slots per level program
        (torch.float64, 4, 9, "whole row", 6, 64, 45),  # a prompt row without real tokens; dim_head 6
        (torch.float32, 8, 21, "left", 8, 4, 45),  # four chunks
    ],
)
def test_kernel_steps_match_parallel_attention(dtype, block_size, prompt_len, padding, d, chunk, n, monkeypatch):
    """The two-launch step against the parallel forward, and its state against the PyTorch step's."""
    pytest.importorskip("triton")
    from h_transformer_1d.attention import decode_kernels

    monkeypatch.setattr(decode_kernels, "CHUNK", chunk)  # ring slots per level program (the package default on a GPU)
    b, h = 2, 2  # each case steps past a position where a new level appears
    generator = torch.Generator().manual_seed(block_size + prompt_len)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, generator=generator) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, : {"none": 0, "left": 5, "whole row": prompt_len}[padding]] = False
    mask = None if padding == "none" else mask
    inputs = [x.to(DEVICE, dtype) for x in (q, k, v)]
    mask_in = None if mask is None else mask.to(DEVICE)
    got, state = step_all(*inputs, mask_in, prompt_len, block_size, static=True, kernel=True)
    assert state.kernel and state.position.item() == n and not state.missing.any()
    full = blocked_h_attention(q, k, v, block_size=block_size, causal=True, key_padding_mask=mask)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu().double(), full[:, :, prompt_len:], rtol=0, atol=atol)
    _, expected = step_all(*inputs, mask_in, prompt_len, block_size, static=True, kernel=False)
    for name in ("ring", "queries"):
        torch.testing.assert_close(getattr(state, name), getattr(expected, name), rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_takes_q_k_v_of_different_layouts(dtype):
    """q, k and v with three different (batch, head) strides, as the model hands them over, each read
    through its own strides (in float32 all three reach the kernel as they are; in float64 q is
    scaled on the host first)."""
    pytest.importorskip("triton")
    b, h, n, d, p = 3, 2, 24, 8, 7
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64, generator=generator)
    q = qkv[:, :, 0].transpose(1, 2)  # (b, h, n, d): a view of the packed projection
    k = qkv[:, :, 1].transpose(1, 2).contiguous()
    v = torch.randn(n, b, h, d, dtype=torch.float64, generator=generator).permute(1, 2, 0, 3)
    inputs = [x.to(DEVICE, dtype) for x in (q, k, v)]
    strides = {x[:, :, 0].stride() for x in inputs}  # what one step hands the kernel
    assert len(strides) == 3 and all(st[-1] == 1 for st in strides)  # no copy needed for any of them
    got, _ = step_all(*inputs, None, p, 4, static=True, kernel=True)
    full = blocked_h_attention(q, k, v, block_size=4, causal=True)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.cpu().double(), full[:, :, p:], rtol=0, atol=atol)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 8), (torch.float64, 8), (torch.float64, 6)])
def test_steps_turn_q_and_k_by_rotary(dtype, d, kernel):
    """advance(..., rotary=(cos, sin)) takes q and k unturned and turns them (the Triton step as it loads
    them): the outputs equal the parallel forward's on q and k turned at every position beforehand
    (dim_head 6: the kernel's feature lanes past D are masked)."""
    if kernel:
        pytest.importorskip("triton")
    b, h, n, p = 2, 3, 30, 6
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, generator=generator) for _ in range(3))
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # the model's rotary frequencies
    turned_q, turned_k = (apply_rotary(x, torch.arange(n), freqs) for x in (q, k))
    angle_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q_in, k_in, v_in, tq_in, tk_in = (x.to(DEVICE, dtype) for x in (q, k, v, turned_q, turned_k))
    cache = HierarchicalCache(4)
    cache.prefill(tq_in[:, :, :p], tk_in[:, :, :p], v_in[:, :, :p])
    state = StaticHierarchicalCache(cache, capacity=n, kernel=kernel)
    outs = []
    for t in range(p, n):
        rotary = rotary_angles(torch.tensor(t, device=DEVICE), freqs.to(DEVICE), angle_dtype)
        outs.append(state.step(q_in[:, :, t], k_in[:, :, t], v_in[:, :, t], rotary=rotary))
    full = blocked_h_attention(turned_q, turned_k, v, block_size=4, causal=True)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.stack(outs, 2).cpu().double(), full[:, :, p:], rtol=0, atol=atol)


@pytest.mark.parametrize("kernel", [True, False])
def test_steps_refuse_rotary_of_the_wrong_shape(kernel):
    """cos and sin of another shape are refused, also where they would broadcast (PyTorch path)."""
    if kernel:
        pytest.importorskip("triton")
    cache = HierarchicalCache(4)
    cache.prefill(*(torch.randn(1, 2, 6, 8, dtype=torch.float64, device=DEVICE) for _ in range(3)))
    state = StaticHierarchicalCache(cache, 10, kernel=kernel)
    x = torch.randn(1, 2, 8, dtype=torch.float64, device=DEVICE)
    for wrong in (torch.ones(8, dtype=torch.float64), torch.ones(1, 4, dtype=torch.float64)):
        wrong = wrong.to(DEVICE)
        with pytest.raises(ValueError, match=r"rotary takes cos and sin of shape \(dim_head / 2,\) = \(4,\)"):
            state.step(x, x, x, rotary=(wrong, wrong))
    assert state.length == 6  # nothing stepped


def test_kernel_refuses_a_chunk_that_is_not_a_power_of_two(monkeypatch):
    pytest.importorskip("triton")
    from h_transformer_1d.attention import decode_kernels

    monkeypatch.setattr(decode_kernels, "CHUNK", 48)
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="CHUNK must be a power of two, got 48"):
        step_all(q, q, q, None, 2, 4, static=True, kernel=True)


def test_kernel_option_is_checked(monkeypatch):
    cache = HierarchicalCache(4)
    cache.prefill(*(torch.randn(1, 1, 6, 4) for _ in range(3)))
    with pytest.raises(TypeError, match="kernel must be True, False or None"):
        StaticHierarchicalCache(cache, 10, kernel="yes")
    assert not StaticHierarchicalCache(cache, 10).kernel  # the default: CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernel=True needs triton and a state on CUDA"):
        StaticHierarchicalCache(cache, 10, kernel=True)


@pytest.mark.parametrize("capacity", [9, 64, 1000, 4096])
def test_static_state_is_logarithmic(capacity):
    b, h, d, nr = 2, 3, 4, 4
    cache = HierarchicalCache(nr)
    cache.prefill(*(torch.randn(b, h, 8, d) for _ in range(3)))
    static = StaticHierarchicalCache(cache, capacity)
    levels = max(1, int(math.log2((capacity - 1) // nr)) + 1)  # levels with keys at position capacity - 1
    assert static.levels == levels
    assert static.ring.shape == (levels * 2 * nr, b, h, 2 * d + 1)
    assert static.queries.shape == (levels, b, h, d)
    stored = sum(t.numel() for t in static.stored_tensors())
    assert stored == levels * (2 * nr * b * h * (2 * d + 1) + b * h * d + b) + 1
    # within the eager cache's bound on kept groups (two blocks a level), plus a query per level
    assert stored <= stored_slots_bound(capacity, nr) * b * h * (2 * d + 1) + levels * (b * h * d + b) + 1
    if capacity == 4096:
        assert stored < capacity * b * h * 2 * d / 20  # a dense KV cache of that many positions is 20x larger


def test_static_cache_checks_its_source():
    cache = HierarchicalCache(4)
    with pytest.raises(ValueError, match="prefill it first"):
        StaticHierarchicalCache(cache, 10)
    cache.prefill(*(torch.randn(1, 1, 6, 4) for _ in range(3)))
    for capacity in (6, 10.0, True, "12"):
        with pytest.raises(ValueError, match="capacity must be an int above the prompt length 6"):
            StaticHierarchicalCache(cache, capacity)
    static = StaticHierarchicalCache(cache, np.int64(8))
    with pytest.raises(ValueError, match="shape"):
        static.step(*(torch.randn(1, 1, 1, 4) for _ in range(3)))  # the eager cache's (B, H, 1, D)
    static.step(*(torch.randn(1, 1, 4) for _ in range(3)))
    static.step(*(torch.randn(1, 1, 4) for _ in range(3)))
    with pytest.raises(ValueError, match="capacity"):
        static.step(*(torch.randn(1, 1, 4) for _ in range(3)))
    cache.step(*(torch.randn(1, 1, 1, 4) for _ in range(3)))
    with pytest.raises(ValueError, match="right after its prefill"):
        StaticHierarchicalCache(cache, 20)
