"""Packed variable-length attention (`h_attention_varlen`) against each sequence computed alone."""

import pytest
import torch
from helpers import rel_err

from h_transformer_1d import h_attention, h_attention_varlen
from h_transformer_1d.attention import varlen
from h_transformer_1d.attention.varlen import VarlenLayout, bucket_lengths

NR = 8
# lengths 1, block_size - 1, block_size + 1, primes, an empty sequence, one past two levels
LENGTHS = [1, NR - 1, NR + 1, 13, 0, 37, 71, 2, NR]


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def randn(*shape, generator, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=generator)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_padding_to_any_length_changes_nothing(causal, impl):
    """The property the bucketed path rests on: a sequence of length n padded to L > n (padding masked
    out, filled with junk) gives on its first n positions exactly the result of the n tokens alone."""
    gen = torch.Generator().manual_seed(0)
    for n, padded in [(1, 8), (7, 16), (9, 64), (37, 40), (37, 128)]:
        q, k, v, g = (randn(1, 2, n, 4, generator=gen) for _ in range(4))
        freqs = torch.rand(2, generator=gen, dtype=torch.float64)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        alone = h_attention(*inputs, block_size=NR, causal=causal, impl=impl, rotary_freqs=freqs)
        alone.backward(g)
        junk = [torch.cat([t, randn(1, 2, padded - n, 4, generator=gen) * 1e3], 2).requires_grad_() for t in (q, k, v)]
        mask = torch.arange(padded)[None] < n
        out = h_attention(*junk, block_size=NR, causal=causal, impl=impl, key_padding_mask=mask, rotary_freqs=freqs)
        out.backward(torch.cat([g, randn(1, 2, padded - n, 4, generator=gen)], 2))
        assert rel_err(out[:, :, :n], alone) < 1e-12, (n, padded)
        for a, e in zip(junk, inputs):
            assert rel_err(a.grad[:, :, :n], e.grad) < 1e-12, (n, padded)
            assert not a.grad[:, :, n:].any()


def one_by_one(q, k, v, lengths, **kw):
    """The definition of the packed result: h_attention on each sequence alone, concatenated."""
    outs, start = [], 0
    for n in lengths:
        if n:
            piece = [t[start : start + n].transpose(0, 1)[None] for t in (q, k, v)]
            outs.append(h_attention(*piece, **kw)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def check_packed(lengths, causal, impl, dtype=torch.float64, expected_impl="reference", rotary=True, tol=1e-12,
                 heads=2, d=8, block_size=NR, kv_heads=None, device="cpu"):  # fmt: skip
    gen = torch.Generator().manual_seed(len(lengths) + causal)
    total = sum(lengths)
    q, g = (randn(total, heads, d, generator=gen) for _ in range(2))
    k, v = (randn(total, kv_heads or heads, d, generator=gen) for _ in range(2))
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d) if rotary else None
    kw = {"block_size": block_size, "causal": causal, "rotary_freqs": freqs}

    exp_in = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = one_by_one(*exp_in, lengths, impl=expected_impl, **kw)
    expected.backward(g)
    got_in = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
    if freqs is not None:
        kw["rotary_freqs"] = freqs.to(device)
    got = h_attention_varlen(*got_in, cu(lengths), max(lengths), impl=impl, **kw)
    got.backward(g.to(device, dtype))
    assert got.shape == (total, heads, d) and got.dtype == dtype
    for name, a, e in zip(("out", "dq", "dk", "dv"), (got, *(t.grad for t in got_in)), (expected, *(t.grad for t in exp_in))):
        assert not a.isnan().any(), name
        assert rel_err(a.cpu(), e) <= tol, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["reference", "blocked"])
def test_packed_equals_each_sequence_alone(causal, impl):
    check_packed(LENGTHS, causal, impl)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_triton_equals_each_sequence_alone(causal):
    """The kernels (Triton's interpreter on the CPU) on the padded buckets, float32 against float64;
    lengths 1, block_size - 1, block_size + 1 and primes past two levels."""
    if torch.cuda.is_available():  # the kernels themselves, in half precision (float32 would run through TF32)
        check_packed([1, 15, 17, 23, 37, 71, 300], causal, "triton", dtype=torch.float16, tol=2e-3, d=64,
                     block_size=16, device="cuda", kv_heads=1)
    else:
        check_packed([1, 15, 17, 23, 37, 71], causal, "triton", dtype=torch.float32, tol=3e-5, d=16, block_size=16)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_grouped_query_attention(causal):
    """k and v with fewer heads than q (4 query heads on 2 and on 1 kv head), per sequence as h_attention."""
    check_packed(LENGTHS, causal, "blocked", heads=4, kv_heads=2)
    check_packed([5, 19, 30], causal, "blocked", heads=4, kv_heads=1)


def test_one_sequence_and_no_rotary():
    check_packed([45], True, "blocked", rotary=False)
    check_packed([3, 3, 3], False, "blocked", rotary=False)


def test_dropout_runs_and_only_zero_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn(30, 2, 4, generator=gen) for _ in range(3))
    out = h_attention_varlen(q, k, v, cu([10, 20]), 20, block_size=NR, dropout_p=0.5)
    assert out.shape == (30, 2, 4) and out.isfinite().all()


def test_no_tokens_gives_an_empty_result():
    q = torch.zeros(0, 2, 4, requires_grad=True)
    out = h_attention_varlen(q, q, q, cu([0, 0]), 0, block_size=NR)
    assert out.shape == (0, 2, 4)


def test_buckets_bound_the_padding_and_their_number():
    lengths = [100, 97, 90, 64, 63, 1, 1, 1, 30, 0]
    buckets = bucket_lengths(lengths, 8)
    members = sorted(i for _, m in buckets for i in m)
    assert members == [i for i, n in enumerate(lengths) if n]  # every non-empty sequence once
    for padded, m in buckets:
        assert all(lengths[i] <= padded for i in m) and padded % 8 == 0
        own = sum(-(-lengths[i] // 8) * 8 for i in m)
        assert padded * len(m) - own <= varlen.MAX_PADDING * padded * len(m)
    many = list(range(1, 400, 7))
    assert len(bucket_lengths(many, 8, max_buckets=3)) == 3
    assert len(bucket_lengths(many, 8)) == varlen.MAX_BUCKETS


def test_layout_round_trip():
    lengths = [5, 0, 17, 3, 8]
    layout = VarlenLayout(lengths, 8)
    x = torch.arange(sum(lengths), dtype=torch.float64)[:, None]
    padded = layout.pad(x)
    assert sum(p.shape[0] for p in padded) == 4
    assert torch.equal(layout.unpad(padded), x)
    first, last = layout.boundaries()
    assert first.nonzero().flatten().tolist() == [0, 5, 22, 25]
    assert last.nonzero().flatten().tolist() == [4, 21, 24, 32]


def test_sequences_do_not_see_each_other():
    """Changing one sequence changes no other sequence's output."""
    gen = torch.Generator().manual_seed(4)
    lengths = [20, 9, 33]
    q, k, v = (randn(62, 2, 4, generator=gen) for _ in range(3))
    out = h_attention_varlen(q, k, v, cu(lengths), 33, block_size=NR, causal=False, impl="blocked")
    k2, v2 = k.clone(), v.clone()
    k2[20:29] += 5.0
    v2[20:29] -= 3.0
    out2 = h_attention_varlen(q, k2, v2, cu(lengths), 33, block_size=NR, causal=False, impl="blocked")
    assert torch.equal(out[:20], out2[:20]) and torch.equal(out[29:], out2[29:])
    assert not torch.equal(out[20:29], out2[20:29])


def test_cu_seqlens_on_other_layouts_of_the_stream():
    """cu_seqlens int32 on the CPU while q, k, v are elsewhere is fine (here both CPU, q non-contiguous)."""
    gen = torch.Generator().manual_seed(6)
    qkv = randn(40, 3, 2, 4, generator=gen)
    q, k, v = qkv.unbind(1)
    out = h_attention_varlen(q, k, v, cu([15, 25]), 25, block_size=NR, impl="blocked")
    ref = one_by_one(q, k, v, [15, 25], block_size=NR, impl="reference")
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"cu_seqlens": [0, 4, 10]}, TypeError, "cu_seqlens must be a torch.Tensor"),
        ({"cu_seqlens": torch.tensor([0, 4, 10])}, TypeError, "cu_seqlens must have dtype torch.int32"),
        ({"cu_seqlens": torch.tensor([[0, 4, 10]], dtype=torch.int32)}, ValueError, "cu_seqlens must have shape"),
        ({"cu_seqlens": torch.tensor([0], dtype=torch.int32)}, ValueError, "cu_seqlens must have shape"),
        ({"cu_seqlens": torch.tensor([1, 4, 10], dtype=torch.int32)}, ValueError, "cu_seqlens must start at 0"),
        ({"cu_seqlens": torch.tensor([0, 4, 9], dtype=torch.int32)}, ValueError, "end at total_tokens = 10"),
        ({"cu_seqlens": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, ValueError, "non-decreasing"),
        ({"max_seqlen": 5}, ValueError, "max_seqlen must be at least the longest sequence, 6"),
        ({"max_seqlen": 6.0}, TypeError, "max_seqlen must be an int"),
        ({"q": torch.zeros(1, 10, 2, 4)}, ValueError, "q must have shape \\(total_tokens, heads, dim_head\\)"),
        ({"k": torch.zeros(9, 2, 4)}, ValueError, "must agree in total_tokens and k and v in heads"),
        ({"k": torch.zeros(10, 1, 4)}, ValueError, "must agree in total_tokens and k and v in heads"),
        ({"k": torch.zeros(10, 3, 4), "v": torch.zeros(10, 3, 4)}, ValueError, "must be a multiple of k's and v's heads"),
        ({"v": torch.zeros(10, 2, 4, dtype=torch.float64)}, TypeError, "share one dtype"),
        ({"block_size": 6}, ValueError, "block_size must be a power of two"),
        ({"causal": 1}, TypeError, "causal must be a bool"),
    ],
)
def test_bad_arguments_are_named(change, error, match):
    args = {"q": torch.zeros(10, 2, 4), "k": torch.zeros(10, 2, 4), "v": torch.zeros(10, 2, 4),
            "cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32), "max_seqlen": 6, "block_size": 4}  # fmt: skip
    args.update(change)
    with pytest.raises(error, match=match):
        h_attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"), args.pop("max_seqlen"),
                           **args)
