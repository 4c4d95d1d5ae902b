"""Grouped-query and multi-query attention: k and v with Hkv heads shared by groups of H / Hkv query heads.

The definition is the dense reference on k and v repeated per query head (query head h uses kv head
h // (H / Hkv)); every path is compared with it in float64 (the Triton kernels in float32, exact in the
interpreter), output and gradients, the kv gradients being the sums over each group."""

import pytest
import torch
from helpers import make_mask

from h_transformer_1d import h_attention
from h_transformer_1d.attention import HierarchicalCache, blocked, fused
from h_transformer_1d.attention.incremental import StaticHierarchicalCache

GROUPS = [(8, 8), (8, 4), (8, 1)]  # (heads, kv heads): groups of 1, 2 and 8


def inputs(b, h, hkv, n, d, seed=0, dv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen)
    k = torch.randn(b, hkv, n, d, dtype=torch.float64, generator=gen)
    v = torch.randn(b, hkv, n, dv or d, dtype=torch.float64, generator=gen)
    grad = torch.randn(b, h, n, dv or d, dtype=torch.float64, generator=gen)
    return q, k, v, grad, gen


def run(q, k, v, grad, dtype=torch.float64, **kw):
    """Output and (dq, dk, dv) of h_attention on copies of q, k, v in `dtype`."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out = h_attention(*leaves, **kw)
    out.backward(grad.to(dtype))
    return out.detach().double(), [t.grad.double() for t in leaves]


def repeated(q, k, v, grad, **kw):
    """The reference with k and v repeated per query head; the kv gradients come back summed per group."""
    h = q.shape[1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(h // t.shape[1], dim=1) for t in leaves[1:])
    out = h_attention(leaves[0], kr, vr, impl="reference", **kw)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def assert_close(got, expected, atol, rel=None):
    """Each of out, dq, dk, dv within `atol` per element or, with `rel`, within `rel` in L2 norm on the
    scale of the inputs (unit normal: about 1 per element), as tests/attention/test_triton.py for TF32."""
    (out, grads), (e_out, e_grads) = got, expected
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, *grads), (e_out, *e_grads)):
        assert a.shape == e.shape, name
        assert not a.isnan().any(), f"{name} has NaN (unwritten) elements"
        if rel is None:
            torch.testing.assert_close(a, e, rtol=0, atol=atol, msg=name)
        else:
            scale = max(float(e.norm()), e.numel() ** 0.5)
            assert float((a - e).norm()) <= rel * scale, f"{name}: {float((a - e).norm()) / scale:.2e}"


@pytest.mark.parametrize("h,hkv", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
def test_reference_is_one_kv_head_per_group(h, hkv, causal):
    """Query head i of the grouped call is single-head attention with kv head i // (h / hkv); the kv
    gradients are the sums over each group (those of the repeated call)."""
    q, k, v, grad, gen = inputs(2, h, hkv, 21, 4)
    kw = {"block_size": 4, "causal": causal, "key_padding_mask": make_mask("gaps", 2, 21, gen)}
    got = run(q, k, v, grad, impl="reference", **kw)
    grp = h // hkv
    for i in range(h):
        one = h_attention(
            q[:, i : i + 1], k[:, i // grp : i // grp + 1], v[:, i // grp : i // grp + 1], impl="reference", **kw
        )
        torch.testing.assert_close(got[0][:, i : i + 1], one, rtol=0, atol=1e-14)
    assert_close(got, repeated(q, k, v, grad, **kw), 1e-14)


@pytest.mark.parametrize("h,hkv", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "gaps"])
def test_blocked_matches_reference(h, hkv, causal, mask_kind):
    q, k, v, grad, gen = inputs(2, h, hkv, 37, 4, dv=6)
    kw = {"block_size": 4, "causal": causal, "key_padding_mask": make_mask(mask_kind, 2, 37, gen)}
    assert_close(run(q, k, v, grad, impl="blocked", **kw), repeated(q, k, v, grad, **kw), 1e-12)


@pytest.mark.parametrize("h,hkv", [(8, 4), (8, 1)])
def test_blocked_head_ranges_and_chunks(monkeypatch, h, hkv):
    """Several ranges of heads per group member (the kv gradients of later members are added) and
    several chunks of blocks per level."""
    monkeypatch.setattr(blocked, "GROUP_BYTES", 1)
    monkeypatch.setattr(blocked, "CHUNK_ELEMENTS_CPU", 64)
    q, k, v, grad, gen = inputs(2, h, hkv, 45, 4)
    kw = {"block_size": 4, "causal": True, "key_padding_mask": make_mask("start", 2, 45, gen)}
    assert_close(run(q, k, v, grad, impl="blocked", **kw), repeated(q, k, v, grad, **kw), 1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_dropout_broadcasts_kv(causal):
    """With dropout (every operation recorded by autograd) the kv heads are broadcast, not repeated: the
    same dropout draws as on repeated k and v, so the results agree exactly."""
    q, k, v, grad, _ = inputs(2, 4, 2, 30, 4)
    kw = {"block_size": 4, "causal": causal, "dropout_p": 0.3}
    torch.manual_seed(1)
    got = run(q, k, v, grad, **kw)
    torch.manual_seed(1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = h_attention(leaves[0], *(t.repeat_interleave(2, dim=1) for t in leaves[1:]), **kw)
    out.backward(grad)
    assert_close(got, (out.detach(), [t.grad for t in leaves]), 1e-12)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write (a kv head no program owns) shows."""
    monkeypatch.setattr(
        fused,
        "alloc",
        lambda *shape, device, dtype: torch.full(
            shape, float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min, device=device, dtype=dtype
        ),
    )


@pytest.mark.usefixtures("poison_outputs")
@pytest.mark.parametrize(
    "h,hkv,n,causal,mask_kind,rotary,custom_ops",
    [
        (8, 4, 40, False, "gaps", False, False),
        (8, 1, 70, True, "none", True, False),
        (4, 2, 64, True, "start", False, True),  # through the custom ops that torch.compile traces
    ],
)
def test_triton_matches_reference(monkeypatch, h, hkv, n, causal, mask_kind, rotary, custom_ops):
    pytest.importorskip("triton")
    monkeypatch.setattr(fused, "VIA_CUSTOM_OPS", custom_ops)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, grad, gen = inputs(2, h, hkv, n, 16)
    mask = make_mask(mask_kind, 2, n, gen)
    freqs = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16) if rotary else None
    kw = {"block_size": 16, "causal": causal, "key_padding_mask": mask, "rotary_freqs": freqs}
    expected = repeated(q, k, v, grad, **kw)
    on = [t.to(device) for t in (q, k, v, grad)]
    kw.update(
        key_padding_mask=None if mask is None else mask.to(device),
        rotary_freqs=None if freqs is None else freqs.float().to(device),
    )
    out, grads = run(*on, dtype=torch.float32, impl="triton", **kw)
    got = (out.cpu(), [g.cpu() for g in grads])
    if torch.cuda.is_available():  # float32 through TF32 tensor cores
        assert_close(got, expected, None, rel=3e-3)
    else:  # exact float32 in the interpreter
        assert_close(got, expected, 1e-5)


@pytest.mark.parametrize(
    "h,hkv,kind", [(4, 2, "eager"), (4, 1, "eager"), (4, 2, "static"), (4, 1, "static"), (4, 2, "kernel")]
)
def test_decoding_caches_hold_kv_heads(h, hkv, kind):
    if kind == "kernel":  # the Triton step (in the interpreter without a GPU: fewer steps)
        pytest.importorskip("triton")
    n, prompt, nr = 45 if kind != "kernel" else 33, 13, 4
    q, k, v, _, _ = inputs(2, h, hkv, n, 8)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :5] = False  # a left-padded prompt
    expected = h_attention(
        q,
        k.repeat_interleave(h // hkv, 1),
        v.repeat_interleave(h // hkv, 1),
        block_size=nr,
        causal=True,
        key_padding_mask=mask,
        impl="reference",
    )
    # the kernel step on the GPU when there is one (compiled), else interpreted on the CPU
    device = "cuda" if kind == "kernel" and torch.cuda.is_available() else "cpu"
    q, k, v, mask = (t.to(device) for t in (q, k, v, mask))
    cache = HierarchicalCache(nr)
    cache.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], key_padding_mask=mask[:, :prompt])
    assert cache.levels[0].k_sum.shape[1] == hkv
    if kind != "eager":
        cache = StaticHierarchicalCache(cache, n, kernel=kind == "kernel")
        assert cache.ring.shape[2] == hkv and cache.queries.shape[2] == h
    steps = []
    for t in range(prompt, n):
        if kind == "eager":
            steps.append(cache.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])[:, :, 0])
        else:
            steps.append(cache.step(q[:, :, t], k[:, :, t], v[:, :, t]))
    torch.testing.assert_close(torch.stack(steps, 2).cpu(), expected[:, :, prompt:], rtol=0, atol=1e-12)


def test_heads_must_be_a_multiple_of_kv_heads():
    q, k, v, _, _ = inputs(1, 6, 4, 10, 4)
    with pytest.raises(ValueError, match=r"q's heads \(6\) must be a multiple of k's and v's heads \(4\)"):
        h_attention(q, k, v, block_size=4)


def test_k_and_v_must_have_the_same_heads():
    q, k, v, _, _ = inputs(1, 4, 2, 10, 4)
    with pytest.raises(ValueError, match="k and v in heads"):
        h_attention(q, k, v[:, :1], block_size=4)


def test_cache_steps_check_kv_heads():
    q, k, v, _, _ = inputs(1, 4, 2, 10, 4)
    cache = HierarchicalCache(4)
    cache.prefill(q, k, v)
    with pytest.raises(ValueError, match=r"k, v of shape \(batch, kv_heads=2, 1, dim_head\)"):
        cache.step(q[:, :, :1], q[:, :, :1], q[:, :, :1])
    static = StaticHierarchicalCache(cache, 20, kernel=False)
    with pytest.raises(ValueError, match=r"k, v of shape \(batch, kv_heads, dim_head\) = \(1, 2, 4\)"):
        static.step(q[:, :, 0], q[:, :, 0], q[:, :, 0])
