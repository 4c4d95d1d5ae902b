"""Incremental decoding with the hierarchical cache against the parallel forward: the eager cache
(HierarchicalCache, decode_step) and the fixed-shape one (StaticHierarchicalCache, StaticDecoder),
whose CUDA graph replay is tested on a GPU (skipped without CUDA)."""

import math

import numpy as np
import pytest
import torch

from h_transformer_1d import AutoregressiveWrapper, HTransformer1D
from h_transformer_1d.attention import hierarchical_attention_reference
from h_transformer_1d.attention.blocked import blocked_h_attention
from h_transformer_1d.attention.incremental import HierarchicalCache, StaticHierarchicalCache
from h_transformer_1d.attention.rotary import apply_rotary, rotary_angles
from h_transformer_1d.model import cache as cache_module
from h_transformer_1d.model.cache import DecodingCache, StaticDecoder, decode_step, prefill
from h_transformer_1d.model.layers import RotaryEmbedding

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton step: compiled, or interpreted on the CPU


SMALL_MODEL = {
    "num_tokens": 29,
    "dim": 32,
    "depth": 2,
    "max_seq_len": 512,
    "causal": True,
    "heads": 2,
    "dim_head": 8,
    "block_size": 4,
}


def small_model(dtype=torch.float64, **kw):
    return HTransformer1D(**{**SMALL_MODEL, **kw}).to(dtype).eval()


def decode_all(model, tokens, mask, prompt_len, static=False, **static_options):
    """Logits (B, N, V) of every position: the prefill's, then one decode step per later position
    (`static`: through a StaticDecoder made after the prefill, with `static_options`)."""
    logits, cache = prefill(model, tokens[:, :prompt_len], None if mask is None else mask[:, :prompt_len])
    later = range(prompt_len, tokens.shape[1])
    if static:
        decoder = StaticDecoder(model, cache, tokens.shape[1], **static_options)
        steps = [decoder.step(tokens[:, t]).clone() for t in later]  # clone: the next step overwrites it
    else:
        steps = [decode_step(model, cache, tokens[:, t]) for t in later]
    return torch.cat([logits, torch.stack(steps, 1)], 1) if steps else logits


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


# ---------------------------------------------------------------- the attention cache alone


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("block_size", [2, 4, 8])
@pytest.mark.parametrize("prompt_len", [0, 1, 5, 37, 64])
def test_steps_match_parallel_attention(block_size, prompt_len, static):
    b, h, n, d = 2, 2, 300, 8
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


def stored_slots_bound(t: int, nr: int) -> float:
    """Groups kept over all levels: two blocks per level with keys, about 2 * nr for all younger levels."""
    return 2 * nr * (math.log2(t / nr) + 3)


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


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize(
    "dtype,reversible,shift",
    [
        (torch.float64, False, False),
        (torch.float64, True, True),
        (torch.float32, False, True),
        (torch.float32, True, False),
    ],
)
@pytest.mark.parametrize("static", [False, True])
def test_decoded_logits_equal_full_forward(dtype, reversible, shift, static):
    model = small_model(dtype, reversible=reversible, shift_tokens=shift)
    tokens = torch.randint(0, 29, (1, 330))
    with torch.no_grad():
        full = model(tokens)
        for prompt_len in (1, 5, 37):
            decoded = decode_all(model, tokens, None, prompt_len, static)
            torch.testing.assert_close(decoded, full, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("reversible,shift", [(False, True), (True, True), (True, False)])
def test_batch_with_left_padded_prompts(reversible, shift, static):
    model = small_model(reversible=reversible, shift_tokens=shift)
    n, prompt_len = 200, 45
    tokens = torch.randint(0, 29, (3, n))
    mask = torch.ones(3, n, dtype=torch.bool)
    mask[0, :7] = False
    mask[2, :40] = False  # prompts of 38, 45 and 5 real tokens
    with torch.no_grad():
        full = model(tokens, mask=mask)
        decoded = decode_all(model, tokens, mask, prompt_len, static)
    torch.testing.assert_close(decoded[mask], full[mask], rtol=0, atol=1e-9)


@pytest.mark.parametrize("static", [False, True])
def test_decoding_runs_past_max_seq_len(static):
    short = small_model(max_seq_len=64, shift_tokens=True)
    long = small_model(max_seq_len=256, shift_tokens=True)
    long.load_state_dict(short.state_dict())
    tokens = torch.randint(0, 29, (2, 200))
    with torch.no_grad():
        torch.testing.assert_close(decode_all(short, tokens, None, 50, static), long(tokens), rtol=0, atol=1e-9)


def test_model_cache_memory_is_logarithmic():
    model = small_model(torch.float32, depth=1)
    with torch.no_grad():
        _, cache = prefill(model, torch.randint(0, 29, (1, 500)))
        for _ in range(12):
            decode_step(model, cache, torch.randint(0, 29, (1,)))
    levels = int(math.log2(cache.length)) + 1
    # k and v sums and counts of the kept groups, two softmax states per level, token shift features
    bound = stored_slots_bound(cache.length, 4) * (2 * 2 * 8 + 1) + levels * 2 * 2 * (8 + 2) + 2 * 32
    assert sum(x.numel() for x in cache.stored_tensors()) <= bound


def test_decode_step_checks_its_input():
    model = small_model()
    with torch.no_grad():
        _, cache = prefill(model, torch.randint(0, 29, (2, 9)))
        with pytest.raises(ValueError, match="one position"):
            model(torch.randint(0, 29, (2, 2)), cache=cache)
        with pytest.raises(ValueError, match="filled by prefill"):
            decode_step(model, DecodingCache(model), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="causal"):
        DecodingCache(small_model(causal=False))
    with pytest.raises(ValueError, match="hierarchical"):
        DecodingCache(small_model(attention="dense"))


# ---------------------------------------------------------------- generate


def test_greedy_tokens_with_and_without_cache():
    wrapper = AutoregressiveWrapper(small_model(torch.float32, shift_tokens=True))
    prompt = torch.randint(0, 29, (2, 23))
    cached = wrapper.generate(prompt, 150, temperature=0.0)
    recomputed = wrapper.generate(prompt, 150, temperature=0.0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_sampling_with_and_without_cache():
    wrapper = AutoregressiveWrapper(small_model())
    prompt = torch.randint(0, 29, (2, 10))
    kw = {"temperature": 0.8, "top_k": 10, "top_p": 0.9}
    torch.manual_seed(1)
    cached = wrapper.generate(prompt, 60, **kw)
    torch.manual_seed(1)
    assert torch.equal(cached, wrapper.generate(prompt, 60, use_cache=False, **kw))


def test_generate_right_padded_prompts_as_left_padded():
    wrapper = AutoregressiveWrapper(small_model(reversible=True, shift_tokens=True))
    real = [torch.randint(1, 29, (n,)) for n in (13, 6)]
    right = torch.zeros(2, 13, dtype=torch.long)
    right_mask = torch.zeros(2, 13, dtype=torch.bool)
    left, left_mask = right.clone(), right_mask.clone()
    for row, seq in enumerate(real):
        right[row, : len(seq)], right_mask[row, : len(seq)] = seq, True
        left[row, 13 - len(seq) :], left_mask[row, 13 - len(seq) :] = seq, True
    from_right = wrapper.generate(right, 40, temperature=0.0, mask=right_mask)
    assert torch.equal(from_right, wrapper.generate(left, 40, temperature=0.0, mask=left_mask))
    assert torch.equal(from_right, wrapper.generate(right, 40, temperature=0.0, mask=right_mask, use_cache=False))
    # greedy: each new token is the argmax of the full forward on the left-padded sequence so far
    with torch.no_grad():
        full_mask = torch.cat([left_mask, torch.ones(2, 40, dtype=torch.bool)], 1)
        logits = wrapper.net(torch.cat([left, from_right], 1), mask=full_mask)
    assert torch.equal(logits[:, 12:-1].argmax(-1), from_right)


def test_generate_stops_at_eos_and_pads():
    wrapper = AutoregressiveWrapper(small_model(), pad_value=0)
    prompt = torch.randint(1, 29, (3, 8))
    free = wrapper.generate(prompt, 30, temperature=0.0)
    eos = int(free[0, 4])
    out = wrapper.generate(prompt, 30, temperature=0.0, eos_token=eos)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits):
            stop = int(hits[0]) + 1
            assert torch.equal(out[row, :stop], free[row, :stop]) and not out[row, stop:].any()


def test_dense_attention_model_generates_by_recomputing():
    wrapper = AutoregressiveWrapper(small_model(attention="dense"))
    prompt = torch.randint(0, 29, (1, 9))
    assert torch.equal(
        wrapper.generate(prompt, 12, temperature=0.0), wrapper.generate(prompt, 12, temperature=0.0, use_cache=False)
    )


def test_generate_checks_mask():
    wrapper = AutoregressiveWrapper(small_model())
    prompt = torch.randint(0, 29, (2, 5))
    with pytest.raises(ValueError, match="mask"):
        wrapper.generate(prompt, 3, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        wrapper.generate(prompt, 3, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="every prompt row"):
        wrapper.generate(prompt, 3, mask=torch.tensor([[True] * 5, [False] * 5]))


# ---------------------------------------------------------------- the Triton step (interpreter on the CPU)


@pytest.mark.parametrize(
    "dtype,block_size,prompt_len,padding,d,chunk",
    [
        (torch.float64, 2, 0, "none", 8, 64),
        (torch.float64, 4, 13, "left", 8, 4),  # two chunks of ring slots per level program
        (torch.float64, 4, 9, "whole row", 6, 64),  # a prompt row without real tokens; dim_head 6
        (torch.float32, 8, 21, "left", 8, 4),  # four chunks
    ],
)
def test_kernel_steps_match_parallel_attention(dtype, block_size, prompt_len, padding, d, chunk, monkeypatch):
    """The two-launch step against the parallel forward, and its state against the PyTorch step's."""
    pytest.importorskip("triton")
    from h_transformer_1d.attention import decode_kernels

    monkeypatch.setattr(decode_kernels, "CHUNK", chunk)  # ring slots per level program (the package default on a GPU)
    b, h, n = 2, 2, 75
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
    b, h, n, d, p = 3, 2, 40, 8, 7
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
    b, h, n, p = 2, 3, 45, 6
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, generator=generator) for _ in range(3))
    freqs = RotaryEmbedding(d).inv_freq
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_decoder_equals_full_forward(dtype):
    """StaticDecoder through the Triton step (which turns q and k by rotary itself) against the full forward."""
    pytest.importorskip("triton")
    model = small_model(dtype, reversible=True, shift_tokens=True).to(DEVICE)
    tokens = torch.randint(0, 29, (2, 56), device=DEVICE)
    mask = torch.ones(2, 56, dtype=torch.bool, device=DEVICE)
    mask[1, :6] = False
    with torch.no_grad():
        full = model(tokens, mask=mask)
        decoded = decode_all(model, tokens, mask, 20, static=True, kernel=True)
    torch.testing.assert_close(decoded[mask], full[mask], rtol=0, atol=TOLERANCE[dtype])


def test_kernel_decoder_launches_under_the_state_device(monkeypatch):
    """Each Triton decoding step runs under its query's device (Triton launches on the current one)."""
    pytest.importorskip("triton")
    from h_transformer_1d.attention import decode_kernels

    seen = []
    original = decode_kernels.launch_device
    monkeypatch.setattr(decode_kernels, "launch_device", lambda t: seen.append(t.device) or original(t))
    model = small_model(torch.float32).to(DEVICE)
    tokens = torch.randint(0, 29, (1, 24), device=DEVICE)
    with torch.no_grad():
        decode_all(model, tokens, None, 20, static=True, kernel=True, graph=False)  # graphs: launched once
    assert len(seen) == 4 * SMALL_MODEL["depth"] and set(seen) == {tokens.device}  # 4 steps, every layer


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_kernel_decoder_on_a_gpu_that_is_not_current():
    """A model on cuda:1 while cuda:0 is current: the decoding kernels launch on the model's GPU."""
    pytest.importorskip("triton")
    torch.cuda.set_device(0)
    model = small_model(torch.float32, reversible=False, shift_tokens=False).to("cuda:1")
    tokens = torch.randint(0, 29, (2, 40), device="cuda:1")
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda:1")
    with torch.no_grad():
        full = model(tokens, mask=mask)
        decoded = decode_all(model, tokens, mask, 12, static=True, kernel=True)
    torch.testing.assert_close(decoded, full, rtol=0, atol=TOLERANCE[torch.float32])


def test_kernel_option_is_checked(monkeypatch):
    cache = HierarchicalCache(4)
    cache.prefill(*(torch.randn(1, 1, 6, 4) for _ in range(3)))
    with pytest.raises(TypeError, match="kernel must be True, False or None"):
        StaticHierarchicalCache(cache, 10, kernel="yes")
    assert not StaticHierarchicalCache(cache, 10).kernel  # the default: CUDA only
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernel=True needs triton and a state on CUDA"):
        StaticHierarchicalCache(cache, 10, kernel=True)


# ---------------------------------------------------------------- fixed-shape decoding (StaticDecoder)


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


def test_static_decoder_greedy_tokens_equal_generate():
    wrapper = AutoregressiveWrapper(small_model(torch.float32, shift_tokens=True))
    prompt = torch.randint(0, 29, (2, 23))
    expected = wrapper.generate(prompt, 150, temperature=0.0)
    with torch.no_grad():
        logits, cache = prefill(wrapper.net, prompt)
        decoder = StaticDecoder(wrapper.net, cache, 23 + 150)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(149):
            out.append(decoder.step(out[-1]).argmax(-1))
    assert torch.equal(torch.stack(out, 1), expected)


def test_static_decoder_checks_its_input(monkeypatch):
    model = small_model()
    with torch.no_grad():
        _, cache = prefill(model, torch.randint(0, 29, (2, 9)))
        with pytest.raises(ValueError, match="capacity"):
            StaticDecoder(model, cache, 9)
        with pytest.raises(ValueError, match="filled by prefill"):
            StaticDecoder(model, DecodingCache(model), 20)
        decoder = StaticDecoder(model, cache, 11)
        with pytest.raises(ValueError, match="tokens must have shape"):
            decoder.step(torch.zeros(3, dtype=torch.long))
        with pytest.raises(TypeError, match="integer token ids"):
            decoder.step(torch.tensor([3.7, 1.2]))
        decoder.step(torch.zeros(2, dtype=torch.long))
        decoder.step(torch.zeros(2, dtype=torch.long))
        with pytest.raises(ValueError, match="capacity"):
            decoder.step(torch.zeros(2, dtype=torch.long))
        _, cache = prefill(model, torch.randint(0, 29, (2, 9)))
        monkeypatch.setattr(cache_module, "torch_version", lambda: (2, 11))
        with pytest.raises(ValueError, match=r"compile=True on the CPU needs torch >= 2\.13"):
            StaticDecoder(model, cache, 20, compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="graph=True needs a model on a CUDA device"):
            StaticDecoder(model, cache, 20, graph=True)
        with pytest.raises(ValueError, match="cuda_graph=True"):
            AutoregressiveWrapper(model).generate(torch.randint(0, 29, (2, 9)), 4, cuda_graph=True)


@pytest.mark.skipif(cache_module.torch_version() < (2, 13), reason="compile on the CPU needs torch >= 2.13")
def test_compiled_static_decoder_equals_full_forward():
    """The step through torch.compile (inductor's CPU code here) computes the same logits."""
    model = small_model(torch.float32, shift_tokens=True)
    tokens = torch.randint(0, 29, (2, 120))
    with torch.no_grad():
        decoded = decode_all(model, tokens, None, 50, static=True, compile=True)
        torch.testing.assert_close(decoded, model(tokens), rtol=0, atol=1e-4)


@pytest.mark.skipif(
    DEVICE == "cpu" and cache_module.torch_version() < (2, 13), reason="compile on the CPU needs torch >= 2.13"
)
def test_generate_with_compiled_steps(monkeypatch):
    """generate(compile=True) decodes through a compiled StaticDecoder: the same greedy tokens as the
    eager cached steps and as recomputing."""
    torch.manual_seed(0)
    wrapper = AutoregressiveWrapper(small_model(torch.float64, shift_tokens=True).to(DEVICE))
    prompt = torch.randint(0, 29, (2, 23), device=DEVICE)
    made = []
    init = StaticDecoder.__init__
    monkeypatch.setattr(StaticDecoder, "__init__", lambda self, *a, **kw: made.append(kw) or init(self, *a, **kw))
    compiled = wrapper.generate(prompt, 40, temperature=0.0, compile=True)
    assert len(made) == 1 and made[0]["compile"] is True
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(compiled, wrapper.generate(prompt, 40, temperature=0.0, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # same shapes: no recompilation
    assert torch.equal(compiled, wrapper.generate(prompt, 40, temperature=0.0, cuda_graph=False))
    assert torch.equal(compiled, wrapper.generate(prompt, 40, temperature=0.0, use_cache=False))
    with pytest.raises(ValueError, match="compile=True needs use_cache=True"):
        wrapper.generate(prompt, 4, use_cache=False, compile=True)
    with pytest.raises(TypeError, match="compile must be True or False"):
        wrapper.generate(prompt, 4, compile="yes")
    dense = AutoregressiveWrapper(small_model(attention="dense").to(DEVICE))
    with pytest.raises(ValueError, match="need a causal hierarchical model"):
        dense.generate(prompt, 4, compile=True)
    assert len(made) == 2


@pytest.mark.skipif(cache_module.torch_version() < (2, 13), reason="compile on the CPU needs torch >= 2.13")
def test_compiled_static_decoder_falls_back_past_the_recompile_limit():
    """A new state shape per decoder recompiles; once torch gives up, the step runs uncompiled."""
    model = small_model(torch.float32)
    tokens = torch.randint(0, 29, (1, 80))
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        torch._dynamo.reset()
        full = model(tokens)
        decode_all(model, tokens[:, :20], None, 10, static=True, compile=True)  # 2 levels: compiles
        with pytest.warns(UserWarning, match="stepping without it"):
            decoded = decode_all(model, tokens, None, 10, static=True, compile=True)  # 5 levels
        torch._dynamo.reset()
    torch.testing.assert_close(decoded, full, rtol=0, atol=1e-4)


@cuda
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shift,reversible,compile", [(False, False, False), (True, True, False), (True, False, True)])
def test_graph_decoder_equals_eager_steps(shift, reversible, compile, kernel):
    """On a GPU, at realistic sizes: the CUDA graph replay (of the compiled step too, with the Triton
    step or the PyTorch one) against decode_step."""
    torch.manual_seed(0)
    config = {"num_tokens": 256, "dim": 128, "depth": 2, "max_seq_len": 8192, "heads": 4, "dim_head": 32}
    model = HTransformer1D(**config, causal=True, block_size=64, shift_tokens=shift, reversible=reversible)
    model = model.cuda().eval()
    n, prompt_len = 3000, 1500
    tokens = torch.randint(0, 256, (2, n), device="cuda")
    mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
    mask[1, :300] = False
    with torch.no_grad():
        eager = decode_all(model, tokens, mask, prompt_len)
        graphed = decode_all(model, tokens, mask, prompt_len, static=True, graph=True, compile=compile, kernel=kernel)
    torch.testing.assert_close(graphed[:, prompt_len:], eager[:, prompt_len:], rtol=0, atol=1e-4)


@cuda
def test_generate_with_and_without_cuda_graph(monkeypatch):
    torch.manual_seed(0)
    wrapper = AutoregressiveWrapper(small_model(torch.float32, shift_tokens=True).cuda())
    prompt = torch.randint(0, 29, (2, 23), device="cuda")
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    graphed = wrapper.generate(prompt, 300, temperature=0.0)
    assert len(replays) == 299  # every step after the first token was a graph replay
    short = wrapper.generate(prompt, 10, temperature=0.0)  # too few tokens to pay for a capture: eager
    assert torch.equal(short, graphed[:, :10]) and len(replays) == 299
    assert torch.equal(graphed, wrapper.generate(prompt, 300, temperature=0.0, cuda_graph=False))
    assert torch.equal(graphed, wrapper.generate(prompt, 300, temperature=0.0, use_cache=False))
