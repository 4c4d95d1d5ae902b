"""Incremental decoding of the model against its full forward: the eager steps (decode_step) and the
fixed-shape ones (StaticDecoder), whose CUDA graph replay is tested on a GPU (skipped without CUDA).
The attention caches alone are tested in tests/attention/test_incremental.py."""

import math

import pytest
import torch
from helpers import stored_slots_bound

from h_transformer_1d import AutoregressiveWrapper, CausalHAttention1D, HTransformer1D
from h_transformer_1d.attention import HierarchicalCache
from h_transformer_1d.model import cache as cache_module
from h_transformer_1d.model.cache import DecodingCache, StaticDecoder, decode_step, prefill

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
    tokens = torch.randint(0, 29, (1, 150))  # positions up to level 5 of blocks of 4
    with torch.no_grad():
        full = model(tokens)
        for prompt_len in (1, 5, 37):
            decoded = decode_all(model, tokens, None, prompt_len, static)
            torch.testing.assert_close(decoded, full, rtol=0, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("reversible,shift", [(False, True), (True, True), (True, False)])
def test_batch_with_left_padded_prompts(reversible, shift, static):
    model = small_model(reversible=reversible, shift_tokens=shift)
    n, prompt_len = 120, 45
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
    tokens = torch.randint(0, 29, (2, 130))  # twice max_seq_len
    with torch.no_grad():
        torch.testing.assert_close(decode_all(short, tokens, None, 50, static), long(tokens), rtol=0, atol=1e-9)


def test_layer_steps_equal_its_full_forward():
    """One CausalHAttention1D with a HierarchicalCache: the prompt fills it, then each later position goes
    through the layer's `step` (forward with a filled cache), equal to the layer on the whole sequence."""
    layer = CausalHAttention1D(16, heads=2, dim_head=8, block_size=4).double()
    x = torch.randn(2, 40, 16, dtype=torch.float64)
    cache = HierarchicalCache(4)
    with torch.no_grad():
        outs = [layer(x[:, :10], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(10, 40)]
        torch.testing.assert_close(torch.cat(outs, 1), layer(x), rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="one position"):
            layer(x[:, :2], cache=cache)


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
    cached = wrapper.generate(prompt, 80, temperature=0.0)
    recomputed = wrapper.generate(prompt, 80, temperature=0.0, use_cache=False)
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_decoder_equals_full_forward(dtype):
    """StaticDecoder through the Triton step (which turns q and k by rotary itself) against the full forward."""
    pytest.importorskip("triton")
    model = small_model(dtype, reversible=True, shift_tokens=True).to(DEVICE)
    tokens = torch.randint(0, 29, (2, 40), device=DEVICE)  # steps 20..39: level 3 appears at 32
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
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


# ---------------------------------------------------------------- fixed-shape decoding (StaticDecoder)


def test_static_decoder_greedy_tokens_equal_generate():
    wrapper = AutoregressiveWrapper(small_model(torch.float32, shift_tokens=True))
    prompt = torch.randint(0, 29, (2, 23))
    expected = wrapper.generate(prompt, 80, temperature=0.0)
    with torch.no_grad():
        logits, cache = prefill(wrapper.net, prompt)
        decoder = StaticDecoder(wrapper.net, cache, 23 + 80)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(79):
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
