"""Numerics at the extremes, every path against the float64 definition (docs/reliability.md, "Numerics and API errors").

Scores are shifted to about +-1e3: q and k carry a large constant feature (q[..., 0] = A, k[..., 0] =
+-A), so every score of a row is +-1e3 plus an O(1) part. A row whose scores are all very negative is
the case where an empty level once set the running maximum and the real levels' weights underflowed.
The constant feature is exact in every precision (its coarse means are exact too) and the scale makes
the kernels' base-2 scaling a power of two, so half precision paths are held to their usual tolerance.

Padded positions hold NaN, +-Inf or huge values: they must reach no output and no gradient.
"""

import math

import pytest
import torch
from helpers import make_mask, rel_err

from h_transformer_1d import h_attention
from h_transformer_1d.attention import hierarchical_attention_reference
from h_transformer_1d.attention.incremental import HierarchicalCache, StaticHierarchicalCache

D = 16  # the kernels' smallest head dim
SCALE = 0.25 / math.log2(math.e)  # scale * log2(e) = 1/4: the kernels' scaled queries stay exact
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
SHIFT = 1e3
# the Triton paths: compiled on a GPU, interpreted on the CPU (TRITON_INTERPRET=1, set in conftest)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tolerance(dtype) -> float:
    """The dtype's tolerance plus the conditioning of scores of size SHIFT: a score carries a rounding
    error of about eps * SHIFT in the precision it is computed in (float32 for half inputs), and the
    weights the same relative error, on every path (the float32 reference too)."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return TOL[dtype] + 4 * eps * SHIFT


POISONS = (float("nan"), float("inf"), -float("inf"), 1e30)


def hostile(b, h, n, dtype, shift, mask_kind, seed):
    """q, k, v (B, H, N, D) in `dtype` whose scores are shift + O(1), padded positions poisoned, the mask,
    and the same inputs clean (padding zeroed) in float64 for the oracle."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, D, dtype=torch.float64, generator=gen) for _ in range(3))
    big = math.sqrt(abs(shift) / SCALE)
    q[..., 0], k[..., 0] = big, math.copysign(big, shift)
    q, k, v = (t.to(dtype) for t in (q, k, v))  # the oracle sees the rounded inputs
    mask = make_mask(mask_kind, b, n, gen)
    pad = ~mask[:, None, :, None]
    clean = [t.double().masked_fill(pad, 0.0) for t in (q, k, v)]
    poisoned = []
    for i, t in enumerate((q, k, v)):
        values = torch.tensor(POISONS, dtype=torch.float64)[(torch.arange(t.numel()) + seed + i) % len(POISONS)]
        poisoned.append(torch.where(pad, values.view(t.shape).to(dtype), t))  # 1e30 overflows half: Inf
    return poisoned, clean, mask


def oracle(clean, mask, nr, causal, grad):
    """The definition in float64 on the clean inputs: output and gradients of q, k, v."""
    inputs = [t.clone().requires_grad_() for t in clean]
    out = hierarchical_attention_reference(*inputs, block_size=nr, causal=causal, key_padding_mask=mask, scale=SCALE)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def check(path, got, grads, expected, expected_grads, mask, dtype):
    real = mask[:, None, :, None]
    tol = tolerance(dtype)
    assert torch.isfinite(got).all(), f"{path}: non-finite output"
    assert (got.masked_select(~real) == 0).all(), f"{path}: padded outputs must be zero"
    assert rel_err(got, expected) <= tol, f"{path}: output {rel_err(got, expected):.2e}"
    for name, g, e in zip("qkv", grads, expected_grads):
        assert torch.isfinite(g).all(), f"{path}: non-finite d{name}"
        assert (g.masked_select(~real) == 0).all(), f"{path}: padded positions of d{name} must be zero"
        # the output is rounded to the input precision: gradients get a few times its tolerance
        assert rel_err(g, e) <= 4 * tol, f"{path}: d{name} {rel_err(g, e):.2e}"


def run_path(impl, poisoned, mask, nr, causal, grad, dropout_p=0.0):
    """Output and gradients of one path, on the CPU (the Triton path runs on KERNEL_DEVICE)."""
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    inputs = [t.to(device).requires_grad_() for t in poisoned]
    out = h_attention(
        *inputs, block_size=nr, causal=causal, key_padding_mask=mask.to(device), scale=SCALE, impl=impl,
        dropout_p=dropout_p,
    )
    out.backward(grad.to(device, out.dtype))
    return out.cpu(), [t.grad.cpu() for t in inputs]


# Every path: (impl, dtypes, block size, N). The blocked path runs on all dtypes (half precision is cast
# to float32 inside); "recorded" is the blocked path with every operation on the autograd tape (the one
# dropout takes: dropout_p = 1e-9 drops nothing at these sizes). The Triton interpreter is slow: one
# small size (three levels), and no bfloat16 (its CPU dot products are wrong, see test_triton.py).
VARIANTS = [  # (causal, shift, mask)
    (causal, shift, mask_kind)
    for causal in (False, True)
    for shift, mask_kind in ((SHIFT, "gaps"), (-SHIFT, "start"), (-SHIFT, "end"))
]
PATHS = [  # impl, dtypes, block size, N, variants
    ("reference", (torch.float64, torch.float32), 4, 37, VARIANTS),
    ("blocked", (torch.float64, torch.float32, torch.float16, torch.bfloat16), 4, 61, VARIANTS),
    ("recorded", (torch.float32,), 4, 61, VARIANTS),
    ("triton", (torch.float32, torch.float16), 16, 80, [(False, SHIFT, "gaps"), (True, -SHIFT, "start")]),
]
CASES = [
    (impl, dtype, nr, n, *variant)
    for impl, dtypes, nr, n, variants in PATHS
    for dtype in dtypes
    for variant in variants
]


@pytest.mark.parametrize("impl,dtype,nr,n,causal,shift,mask_kind", CASES)
def test_extreme_scores_and_poisoned_padding(impl, dtype, nr, n, causal, shift, mask_kind):
    if impl == "triton":
        pytest.importorskip("triton")
        if KERNEL_DEVICE == "cuda" and dtype == torch.float32:
            pytest.skip("float32 kernels on a GPU multiply in TF32, whose rounding of 1e3 scores exceeds float32's tolerance")
    seed = len(CASES) and CASES.index((impl, dtype, nr, n, causal, shift, mask_kind))
    poisoned, clean, mask = hostile(2, 2, n, dtype, shift, mask_kind, seed)
    grad = torch.randn(2, 2, n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    expected, expected_grads = oracle(clean, mask, nr, causal, grad)
    kind, dropout_p = ("blocked", 1e-9) if impl == "recorded" else (impl, 0.0)
    got, grads = run_path(kind, poisoned, mask, nr, causal, grad, dropout_p)
    assert got.dtype == dtype
    check(impl, got, grads, expected, expected_grads, mask, dtype)


@pytest.mark.parametrize("kind", ["eager", "static", "static-kernel"])
@pytest.mark.parametrize("shift", [SHIFT, -SHIFT])
def test_decoding_extreme_scores_and_poisoned_prompt(kind, shift):
    """The caches' steps after a prompt whose padding is poisoned, at scores of +-1e3 (float32)."""
    if kind == "static-kernel":
        pytest.importorskip("triton")
    b, h, n, prompt, nr = 2, 2, 40, 23, 4
    poisoned, clean, mask = hostile(b, h, n, torch.float32, shift, "gaps", seed=int(shift > 0))
    mask[:, prompt:] = True  # stepped positions are real tokens
    poisoned = [torch.where(mask[:, None, :, None], c.float(), p) for c, p in zip(clean, poisoned)]
    expected = hierarchical_attention_reference(*clean, block_size=nr, causal=True, key_padding_mask=mask, scale=SCALE)
    device = KERNEL_DEVICE if kind == "static-kernel" else "cpu"
    cache = HierarchicalCache(nr, scale=SCALE)
    q, k, v = (t.to(device) for t in poisoned)
    mask = mask.to(device)
    cache.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mask[:, :prompt])
    if kind == "eager":
        steps = [
            cache.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])[:, :, 0] for t in range(prompt, n)
        ]
    else:
        static = StaticHierarchicalCache(cache, capacity=n, kernel=kind == "static-kernel")
        steps = [static.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(prompt, n)]
    got = torch.stack(steps, 2).cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected[:, :, prompt:]) <= tolerance(torch.float32)


def test_reference_causal_rows_never_read_later_positions_even_nan():
    """A NaN or Inf at a real later position changes no earlier causal row of the definition: it groups
    and selects, never multiplies a later position's content by a zero weight. (The fast paths promise
    this for padded positions only: their diagonal blocks multiply later values by zero weights.)"""
    impl = "reference"
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 48, D, generator=gen) for _ in range(3))
    nr, cut = 16, 29
    clean = h_attention(q, k, v, block_size=nr, causal=True, impl=impl)
    for t, value in zip((q, k, v), (float("nan"), float("inf"), float("nan"))):
        t[:, :, cut:] = value
    got = h_attention(q, k, v, block_size=nr, causal=True, impl=impl)
    assert torch.equal(got[:, :, :cut], clean[:, :, :cut])


def test_issue_example_all_scores_very_negative():
    """A row whose every score is about -100 (the issue's example): the blocked path equals the definition."""
    q = torch.ones(1, 1, 64, 16)
    k, v = -25 * q, torch.randn(1, 1, 64, 16)
    for causal in (False, True):
        got = h_attention(q, k, v, block_size=4, causal=causal)
        expected = h_attention(q, k, v, block_size=4, causal=causal, impl="reference")
        assert rel_err(got, expected) < 1e-5


HUGE_BLOCK = 1 << 40  # sized by the block, one level would need terabytes: it must be sized by N


def plain_attention(q, k, v, causal):
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), -torch.inf)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("impl,causal", [("blocked", False), ("blocked", True), ("reference", True), ("triton", True)])
def test_block_size_far_above_length_costs_plain_attention(impl, causal):
    """With N <= 2 * block_size the definition is plain attention: computed at its cost, not the block's."""
    if impl == "triton":
        pytest.importorskip("triton")
    device = KERNEL_DEVICE if impl == "triton" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # no TF32 rounding on a GPU
    q, k, v = (torch.randn(2, 2, 10, D, dtype=dtype, device=device) for _ in range(3))
    got = h_attention(q, k, v, block_size=HUGE_BLOCK, causal=causal, impl=impl)
    expected = plain_attention(*(t.double() for t in (q, k, v)), causal)
    assert rel_err(got, expected) < (2e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_decoding_cache_with_block_size_far_above_length(static):
    """The caches hold what the positions need, whatever the block size (the eager one grows its rings,
    the fixed-shape one is sized by its capacity)."""
    b, h, n, prompt = 1, 2, 12, 5
    q, k, v = (torch.randn(b, h, n, D, dtype=torch.float64) for _ in range(3))
    cache = HierarchicalCache(HUGE_BLOCK)
    cache.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    if static:
        cache = StaticHierarchicalCache(cache, capacity=n, kernel=False)
        steps = [cache.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(prompt, n)]
    else:
        steps = [
            cache.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])[:, :, 0] for t in range(prompt, n)
        ]
    assert rel_err(torch.stack(steps, 2), plain_attention(q, k, v, True)[:, :, prompt:]) < 1e-12
    assert sum(t.numel() for t in cache.stored_tensors()) <= 4 * n * b * h * (2 * D + 1)


@pytest.mark.parametrize("dropout_p", [0.0, 1e-9])
@pytest.mark.parametrize("causal", [False, True])
def test_own_value_dim_matches_reference(causal, dropout_p):
    """v with its own head dim (as the definition allows): the blocked path, both of its forms, equals it."""
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 2, 45, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    v, grad = (torch.randn(2, 2, 45, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    mask = make_mask("gaps", 2, 45, gen)
    results = []
    for impl, p in (("reference", 0.0), ("blocked", dropout_p)):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = h_attention(*inputs, block_size=4, causal=causal, key_padding_mask=mask, impl=impl, dropout_p=p)
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in inputs)])
    for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
        assert a.shape == e.shape and rel_err(a, e) < 1e-12 + 2 * dropout_p, name  # kept weights grow by 1/(1-p)
