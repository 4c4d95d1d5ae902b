"""Every fast path of hierarchical attention against the dense float64 definition."""

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_mask, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from h_transformer_1d import h_attention
from h_transformer_1d.attention import covering_level, hierarchical_attention_reference

# committed with the tests (tests/data/README.md): a missing file fails the test instead of skipping it
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "h_attention_golden.pt"


def random_qkv(b, h, n, d, dtype=torch.float64, generator=None):
    return [torch.randn(b, h, n, d, dtype=dtype, generator=generator).requires_grad_() for _ in range(3)]


def forward_backward(fn, q, k, v, grad_out, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


# ---------------------------------------------------------------- the definition itself


def test_covering_map_matches_design_doc():
    expected = """
        0 0 0 0 1 1 1 1 2 2 2 2 2 2 2 2
        0 0 0 0 1 1 1 1 2 2 2 2 2 2 2 2
        0 0 0 0 0 0 1 1 2 2 2 2 2 2 2 2
        0 0 0 0 0 0 1 1 2 2 2 2 2 2 2 2
        1 1 0 0 0 0 0 0 1 1 1 1 2 2 2 2
        1 1 0 0 0 0 0 0 1 1 1 1 2 2 2 2
        1 1 1 1 0 0 0 0 0 0 1 1 2 2 2 2
        1 1 1 1 0 0 0 0 0 0 1 1 2 2 2 2
        2 2 2 2 1 1 0 0 0 0 0 0 1 1 1 1
        2 2 2 2 1 1 0 0 0 0 0 0 1 1 1 1
        2 2 2 2 1 1 1 1 0 0 0 0 0 0 1 1
        2 2 2 2 1 1 1 1 0 0 0 0 0 0 1 1
        2 2 2 2 2 2 2 2 1 1 0 0 0 0 0 0
        2 2 2 2 2 2 2 2 1 1 0 0 0 0 0 0
        2 2 2 2 2 2 2 2 1 1 1 1 0 0 0 0
        2 2 2 2 2 2 2 2 1 1 1 1 0 0 0 0"""
    rows = [[int(c) for c in line.split()] for line in expected.strip().splitlines()]
    assert covering_level(16, 2).tolist() == rows


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_golden_vectors(impl):
    golden = torch.load(GOLDEN, weights_only=True)
    cases = sorted({key.split(".")[0] for key in golden})
    assert cases
    for case in cases:
        _n, block_size, causal, masked = golden[f"{case}.meta"].tolist()
        out = h_attention(
            golden[f"{case}.q"],
            golden[f"{case}.k"],
            golden[f"{case}.v"],
            block_size=int(block_size),
            causal=bool(causal),
            key_padding_mask=golden[f"{case}.mask"] if masked else None,
            impl=impl,
        )
        assert rel_err(out, golden[f"{case}.out"]) <= 1e-10, case


@pytest.mark.parametrize("causal", [False, True])
def test_short_sequences_are_exact_softmax_attention(causal):
    # with at most two blocks, level 0 covers every pair: the definition is plain attention
    q, k, v = random_qkv(2, 3, 13, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for impl in ("reference", "blocked"):
        out = h_attention(q, k, v, block_size=8, causal=causal, impl=impl)
        assert rel_err(out, expected) <= 1e-12


# ---------------------------------------------------------------- blocked vs reference, float64

BLOCK_SIZES = [2, 4, 16, 64]
MASKS = ["none", "end", "start", "gaps"]


def float64_cases():
    for nr, causal, mask in itertools.product(BLOCK_SIZES, [False, True], MASKS):
        for n in sorted({1, 7, nr, nr + 1, 3 * nr + 5}):
            yield n, nr, causal, mask, 16 if n % 2 else 64
        # the long case once per block size and variant, both head dims over the mask kinds: an awkward
        # length with at least three coarse levels (the reference's cost grows as N^2, so no longer)
        yield max(200, 8 * nr + 7), nr, causal, mask, 16 if mask in ("none", "start") else 64


@pytest.mark.parametrize("n,nr,causal,mask_kind,d", list(float64_cases()))
def test_blocked_matches_reference_float64(n, nr, causal, mask_kind, d):
    gen = torch.Generator().manual_seed(hash((n, nr, causal, mask_kind, d)) % 2**31)
    q, k, v = random_qkv(2, 3, n, d, generator=gen)
    mask = make_mask(mask_kind, 2, n, gen)
    grad_out = torch.randn(2, 3, n, d, dtype=torch.float64, generator=gen)
    kw = {"block_size": nr, "causal": causal, "key_padding_mask": mask}
    expected = forward_backward(hierarchical_attention_reference, q, k, v, grad_out, **kw)
    got = forward_backward(h_attention, q, k, v, grad_out, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert rel_err(a, b) <= 1e-10, name


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)]
)
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_tolerance(dtype, tol, causal):
    gen = torch.Generator().manual_seed(1)
    n, nr, d = 203, 16, 32
    q, k, v = random_qkv(2, 3, n, d, generator=gen)
    mask = make_mask("gaps", 2, n, gen)
    grad_out = torch.randn(2, 3, n, d, dtype=torch.float64, generator=gen)
    kw = {"block_size": nr, "causal": causal, "key_padding_mask": mask}
    expected = forward_backward(hierarchical_attention_reference, q, k, v, grad_out, **kw)
    low = [t.to(dtype) for t in (q, k, v)]
    got = forward_backward(h_attention, *low, grad_out.to(dtype), **kw)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
        assert rel_err(a, b) <= tol, name


def test_no_quadratic_intermediate():
    """The blocked path never materialises anything near N x N (memory O(N * block_size))."""

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    n, nr, d = 4096, 16, 8
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    for causal in (False, True):
        with LargestTensor() as mode:
            h_attention(q, k, v, block_size=nr, causal=causal).sum().backward()
        assert mode.largest <= 3 * nr * n, mode.largest  # level-0 scores; N * N would be 16.7M


# ---------------------------------------------------------------- causal properties


def causal_case(n=150, nr=4, d=8, masked=False):
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(2, 2, n, d, generator=gen)
    mask = make_mask("gaps", 2, n, gen) if masked else None
    return q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
def test_causal_no_output_depends_on_a_later_input(masked):
    q, k, v, mask = causal_case(masked=masked)
    n = q.shape[2]
    out = h_attention(q, k, v, block_size=4, causal=True, key_padding_mask=mask)
    for i in (0, 3, 4, 37, 64, 100, n - 2):
        out[:, :, i].sum().backward(retain_graph=True)
        for t in (q, k, v):
            assert t.grad[:, :, i + 1 :].abs().max() == 0
            t.grad = None


def test_causal_every_output_sees_every_earlier_input():
    q, k, v, _ = causal_case(n=300)
    out = h_attention(q, k, v, block_size=4, causal=True)
    for i in (5, 64, 127, 200, 299):
        out[:, :, i].sum().backward(retain_graph=True)
        for t in (k, v):
            seen = t.grad[:, :, : i + 1].abs().amax(-1)  # (B, H, i+1)
            assert (seen > 0).all(), f"position {i} misses earlier inputs"
            t.grad = None
        q.grad = None


@pytest.mark.parametrize("masked", [False, True])
def test_causal_output_does_not_depend_on_total_length(masked):
    q, k, v, mask = causal_case(n=260, masked=masked)
    full = h_attention(q, k, v, block_size=4, causal=True, key_padding_mask=mask)
    for n in (1, 17, 64, 129, 200):
        part = h_attention(
            q[:, :, :n], k[:, :, :n], v[:, :, :n], block_size=4, causal=True,
            key_padding_mask=None if mask is None else mask[:, :n],
        )
        assert rel_err(part, full[:, :, :n]) <= 1e-12


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("causal", [False, True])
def test_padded_content_and_extra_padding_do_not_matter(causal):
    gen = torch.Generator().manual_seed(5)
    n = 77
    q, k, v = random_qkv(2, 2, n, 8, generator=gen)
    mask = make_mask("gaps", 2, n, gen)
    out = h_attention(q, k, v, block_size=4, causal=causal, key_padding_mask=mask)
    pad = ~mask[:, None, :, None]
    noisy = [t.detach() + 100 * torch.randn_like(t) * pad for t in (q, k, v)]
    out_noisy = h_attention(*noisy, block_size=4, causal=causal, key_padding_mask=mask)
    assert torch.equal(out[pad.expand_as(out)], torch.zeros_like(out[pad.expand_as(out)]))
    assert rel_err(out_noisy, out) <= 1e-12
    extra = 40
    longer = [F.pad(t.detach(), (0, 0, 0, extra), value=7.0) for t in (q, k, v)]
    longer_mask = F.pad(mask, (0, extra), value=False)
    out_longer = h_attention(*longer, block_size=4, causal=causal, key_padding_mask=longer_mask)
    assert rel_err(out_longer[:, :, :n], out) <= 1e-12
    assert out_longer[:, :, n:].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zeros_not_nan(causal, dtype):
    q, k, v = (torch.randn(2, 2, 50, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1] = False
    out = h_attention(q, k, v, block_size=4, causal=causal, key_padding_mask=mask)
    assert out[1].abs().max() == 0 and not out.isnan().any()
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_rotary_freqs_equal_rotating_q_and_k_first(impl):
    """h_attention(..., rotary_freqs=f) is attention on q, k rotated at positions 0..N-1."""
    from h_transformer_1d.attention.rotary import apply_rotary

    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 37, 16, dtype=torch.float64, generator=gen) for _ in range(3))
    freqs = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    pos = torch.arange(37)
    got = h_attention(q, k, v, block_size=4, causal=True, rotary_freqs=freqs, impl=impl)
    expected = h_attention(apply_rotary(q, pos, freqs), apply_rotary(k, pos, freqs), v, block_size=4, causal=True,
                           impl=impl)
    assert torch.equal(got, expected)
    assert rel_err(got, h_attention(q, k, v, block_size=4, causal=True, impl=impl)) > 1e-3  # it does rotate


@pytest.mark.parametrize("n", [300, 320])  # the blocked path cuts a padded result to N rows, or not
def test_output_is_an_ordinary_tensor(n):
    """The output may be modified in place (no "view created inside a custom Function" error); after
    that, backward through it refuses, as for any tensor autograd saved, rather than return wrong
    gradients."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = h_attention(q, k, v, block_size=16)
    expected = out.detach() + 1.0
    out.add_(1.0)
    assert torch.equal(out.detach(), expected)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with torch.no_grad():
        assert torch.equal(h_attention(q, k, v, block_size=16).add_(1.0), expected)
