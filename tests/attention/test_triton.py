"""The Triton kernels against the dense float64 definition.

Without a GPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest) at small
sizes; with one, the realistic sizes below run too.
"""

import math

import pytest
import torch
from helpers import make_mask, rel_err

from h_transformer_1d import h_attention
from h_transformer_1d.attention import fused, level_lengths

triton = pytest.importorskip("triton")
from h_transformer_1d.attention import triton_kernels as tk

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 runs exactly in the interpreter and through TF32 tensor cores on a GPU
TOL = {torch.float32: 3e-3 if torch.cuda.is_available() else 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write shows up."""

    def nan_alloc(*shape, device, dtype):
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min  # integers: a wild index
        return torch.full(shape, fill, device=device, dtype=dtype)

    monkeypatch.setattr(fused, "alloc", nan_alloc)


def check_against_reference(n, nr, causal, mask_kind, d, dtype, b=2, h=2, reference="reference", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64, generator=gen) for _ in range(3))
    grad = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen)
    mask = make_mask(mask_kind, b, n, gen)
    kw = {"block_size": nr, "causal": causal}

    exp_in = [t.to(DEVICE).clone().requires_grad_() for t in (q, k, v)]
    expected = h_attention(*exp_in, key_padding_mask=None if mask is None else mask.to(DEVICE), impl=reference, **kw)
    expected.backward(grad.to(DEVICE))

    got_in = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    got = h_attention(*got_in, key_padding_mask=None if mask is None else mask.to(DEVICE), impl="triton", **kw)
    got.backward(grad.to(DEVICE, dtype))
    assert got.dtype == dtype
    for name, a, e in zip(("out", "dq", "dk", "dv"), (got, *(t.grad for t in got_in)), (expected, *(t.grad for t in exp_in))):
        assert not a.isnan().any(), f"{name} has unwritten (NaN) elements"
        # a gradient that is exactly zero (dq with one key) is compared on the scale of the inputs
        # (unit normal q, k, v and output gradient: about 1 per element)
        scale = max(float(e.detach().double().norm()), e.numel() ** 0.5)
        assert float((a.detach().double() - e.detach().double()).norm()) <= TOL[dtype] * scale, name


# Triton's CPU interpreter computes bfloat16 dot products wrongly, so bfloat16 runs on GPUs only
bf16_needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 tl.dot is wrong in the interpreter")

SMALL_CASES = [
    # n, block_size, causal, mask, head dim, dtype
    (1, 16, False, "none", 16, torch.float32),
    (17, 16, True, "end", 16, torch.float32),
    (40, 16, False, "gaps", 32, torch.float32),
    (100, 16, True, "gaps", 16, torch.float32),
    (150, 16, False, "start", 16, torch.float16),
    (150, 16, True, "none", 32, torch.float16),
    pytest.param(150, 16, True, "none", 32, torch.bfloat16, marks=bf16_needs_gpu),
    (97, 32, True, "start", 16, torch.float16),
    (130, 32, False, "end", 16, torch.float32),
    pytest.param(130, 32, False, "end", 16, torch.bfloat16, marks=bf16_needs_gpu),
    # uniform levels (no mask, N a multiple of the top block): no per-key log-count; blocks 16 (tiles
    # wider than half a block: the half-block mask runs) and 32, 64 (it does not)
    (128, 16, True, "none", 16, torch.float32),
    (256, 32, False, "none", 32, torch.float32),
    (128, 32, True, "none", 16, torch.float16),
    (256, 64, True, "none", 16, torch.float32),
    # the widest head the kernels take (narrower tiles: WIDE_HEAD_TILES)
    (70, 16, True, "gaps", 256, torch.float32),
    # head dims between the kernels' widths: zero-padded to the next (24 -> 32, 8 -> 16)
    (70, 16, True, "gaps", 24, torch.float32),
    (45, 16, False, "end", 8, torch.float32),
]


@pytest.mark.parametrize("n,nr,causal,mask_kind,d,dtype", SMALL_CASES)
def test_kernels_match_reference_small(n, nr, causal, mask_kind, d, dtype):
    check_against_reference(n, nr, causal, mask_kind, d, dtype)


@pytest.mark.parametrize("n,causal,mask_kind", [(150, False, "gaps"), (131, True, "start"), (77, True, "none")])
def test_chained_coarsening_launches(monkeypatch, n, causal, mask_kind):
    """Deep hierarchies coarsen in launches of COARSEN_LV levels and fold in launches of LV levels;
    1 level each makes short sequences need several of each."""
    monkeypatch.setattr(tk, "LV", 1)
    monkeypatch.setattr(tk, "COARSEN_LV", 1)
    monkeypatch.setattr(fused, "LAYOUT_TABLES", {})
    check_against_reference(n, 16, causal, mask_kind, 16, torch.float32)


@pytest.mark.parametrize("n,hkv", [(100, 2), (40, 1)])
def test_forward_keeps_the_values_in_place(n, hkv):
    """For the backward the forward keeps v itself, not a copy: the packed values hold the coarse levels
    only, and every other saved tensor is the output, the log-sum-exps, packed q and k, the counts, the
    first tokens and the layout tables."""
    b, h, d, nr = 2, 2, 16, 16
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(b, h, n, d, generator=gen).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, generator=gen).requires_grad_() for _ in range(2))
    out = h_attention(q, k, v, block_size=nr, causal=False, impl="triton")
    saved = out.grad_fn.saved_tensors
    lengths = level_lengths(n, nr)
    mtot, m0 = sum(lengths), lengths[0]
    assert any(t.data_ptr() == v.data_ptr() and t.shape == v.shape for t in saved)
    shapes = sorted(tuple(t.shape) for t in saved if t is not None and t.data_ptr() != v.data_ptr())
    assert shapes == sorted([(b, h, n, d), (b, h, m0), (b, h, mtot, d), (b, hkv, mtot, d), (b, hkv, mtot - m0, d),
                             (b, mtot), (b, mtot), tuple(fused.layout_tables(n, nr, "cpu").shape)])


@pytest.mark.parametrize("n,hkv", [(100, 2), (40, 1), (16, 2)])  # 2 coarse levels; 1; none (one block)
def test_backward_launches_and_buffers(monkeypatch, n, hkv):
    """The backward is one fold launch, then dq and dk/dv on the coarse levels, then on level 0, which
    writes dq, dk, dv itself: no other launch, and the gradient buffers it allocates besides dq, dk, dv
    hold the coarse rows only (the packed level 0 never gets a gradient copy)."""
    b, h, d, nr = 2, 2, 16, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, n, d, generator=gen).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, generator=gen).requires_grad_() for _ in range(2))
    out = h_attention(q, k, v, block_size=nr, causal=True, impl="triton")
    lengths = level_lengths(n, nr)
    mc = sum(lengths[1:])
    launches, allocated = [], []
    real_launch, real_alloc, real_fold = tk.launch, fused.alloc, tk.fold_kernel

    class Fold:  # fold_kernel[grid](...) launches without tk.launch
        def __getitem__(self, grid):
            launches.append("fold_kernel")
            return real_fold[grid]

    monkeypatch.setattr(tk, "launch", lambda kernel, *a, **kw: launches.append(
        (kernel.fn.__name__, kw["LEVEL0"])) or real_launch(kernel, *a, **kw))
    monkeypatch.setattr(tk, "fold_kernel", Fold())
    monkeypatch.setattr(fused, "alloc", lambda *shape, **kw: allocated.append(shape) or real_alloc(*shape, **kw))
    out.backward(torch.randn_like(out))
    window = [("window_bwd_dq_kernel", False), ("window_bwd_dkdv_kernel", False)] if mc else []
    window += [("window_bwd_dq_kernel", True), ("window_bwd_dkdv_kernel", True)]
    assert launches == ["fold_kernel", *window]
    mtot = sum(lengths)
    folded = b * h * mtot * d + 2 * b * h * mtot  # dO rows, ref and Delta of every packed row
    coarse_grads = (h + 2 * hkv) * b * max(mc, 1) * d
    outputs = (h + 2 * hkv) * b * n * d
    assert sum(math.prod(s) for s in allocated) == folded + coarse_grads + outputs
    for t, e in ((q, (b, h, n, d)), (k, (b, hkv, n, d)), (v, (b, hkv, n, d))):
        assert t.grad.shape == e and not t.grad.isnan().any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tile shapes")
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
@pytest.mark.parametrize("n,causal,mask_kind", [(300, True, "gaps"), (260, False, "end"), (200, True, "none")])
def test_unequal_tiles(monkeypatch, tiles, n, causal, mask_kind):
    """Query and key tiles of different sizes: the spans along the causal diagonal and the coarse
    half-blocks round to whole tiles on either side (block 64: coarse spans narrow to half-blocks of
    32 rows, one tile of 32 or two of 16)."""
    shapes = force_tiles(monkeypatch, tiles)
    check_against_reference(n, 64, causal, mask_kind, 16, torch.float32)
    for kernel, shape in shapes.items():
        assert {s[:2] for s in shape()} == {tiles}, kernel.fn.__name__


GPU_TILES = sorted({tk.tile_shape(c) for c in tk.FWD_CONFIGS + tk.DQ_CONFIGS + tk.BWD_CONFIGS})


@cuda
@pytest.mark.parametrize("tiles", GPU_TILES, ids=["x".join(map(str, t)) for t in GPU_TILES])
@pytest.mark.parametrize("n,nr,causal,mask_kind", [(1100, 256, True, "gaps"), (700, 128, False, "end"),
                                                   (2100, 512, True, "start"), (2048, 512, True, "none"),
                                                   (1024, 128, False, "none")])
def test_every_tile_config_on_gpu(monkeypatch, tiles, n, nr, causal, mask_kind):
    """Each tile shape autotuning may choose, forced in turn (with H_TRANSFORMER_1D_AUTOTUNE=0 only the
    first of each list runs, so the others would go unchecked): the kernels whose configs hold it take
    it, the others their default (autotuning off, so that the default is one shape)."""
    monkeypatch.setenv("H_TRANSFORMER_1D_AUTOTUNE", "0")
    shapes = force_tiles(monkeypatch, tiles)
    check_against_reference(n, nr, causal, mask_kind, 64, torch.bfloat16, b=2, h=2)
    ran = [shape() for shape in shapes.values()]
    assert tiles in set().union(*ran) and all(len(r) == 1 for r in ran)


def test_a_forced_tile_must_fit_the_block(monkeypatch):
    force_tiles(monkeypatch, (32, 32))
    with pytest.raises(ValueError, match=r"FORCE_TILES \[\(32, 32\)\]: a forced tile is larger than the block \(16\)"):
        check_against_reference(40, 16, True, "none", 16, torch.float32)


def force_tiles(monkeypatch, tiles):
    """Make the window kernels take the tile shape `tiles` (where their configs hold it); returns, for
    each kernel, a function giving the shapes (BLOCK_M, BLOCK_N, warps, stages) it has run with since."""
    monkeypatch.setattr(tk, "FORCE_TILES", frozenset({tiles}))
    kernels = (tk.window_fwd_kernel, tk.window_bwd_dq_kernel, tk.window_bwd_dkdv_kernel)
    for kernel in kernels:  # the autotuners remember the tile chosen per key
        monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(tk, "CHOSEN_CONFIGS", {})  # and so does tk.launch
    return {kernel: (lambda kernel=kernel: {tk.tile_shape(c) for c in kernel.cache.values()}) for kernel in kernels}


@pytest.mark.parametrize("n,causal,mask_kind", [(75, False, "gaps"), (130, True, "start")])
@pytest.mark.parametrize("d", [16, 20])  # 20: zero-padded to 32, the padded rotary pairs turned by angle 0
def test_kernels_rotate_on_the_fly(n, causal, mask_kind, d):
    """rotary_freqs: the kernels rotate q and k while coarsening and turn dq, dk back; equal to the
    float64 blocked path on inputs rotated beforehand (forward and gradients)."""
    gen = torch.Generator().manual_seed(5)
    b, h = 2, 2
    q, k, v, g = (torch.randn(b, h, n, d, dtype=torch.float64, generator=gen) for _ in range(4))
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    mask = make_mask(mask_kind, b, n, gen).to(DEVICE)

    def run(impl, dtype):
        inputs = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out = h_attention(*inputs, block_size=16, causal=causal, key_padding_mask=mask, impl=impl,
                          rotary_freqs=freqs.to(DEVICE))
        out.backward(g.to(DEVICE, dtype))
        return [out] + [t.grad for t in inputs]

    for name, a, e in zip(("out", "dq", "dk", "dv"), run("triton", torch.float32), run("blocked", torch.float64)):
        assert not a.isnan().any(), name
        assert rel_err(a, e) <= TOL[torch.float32] * 3, name


def test_rotary_tables_follow_the_frequencies_not_their_address():
    """The kernels' cos/sin tables are cached per frequency tensor: frequencies that start at the same
    address as cached ones (a view of the same memory, or memory freed and handed out again) but differ in
    length or values get tables of their own."""
    gen = torch.Generator().manual_seed(9)
    n = 40
    memory = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    for d, freqs in ((32, memory), (16, memory[:8])):  # same data_ptr and version, 8 frequencies not 16
        q, k, v = (torch.randn(1, 2, n, d, dtype=torch.float64, generator=gen) for _ in range(3))
        got = h_attention(*(t.to(DEVICE, torch.float32) for t in (q, k, v)), block_size=16, impl="triton",
                          rotary_freqs=freqs.to(DEVICE))
        expected = h_attention(q, k, v, block_size=16, impl="blocked", rotary_freqs=freqs.double())
        assert rel_err(got, expected) <= TOL[torch.float32] * 3, d
    table = fused.rotary_table(n, memory[:8])
    assert table.shape == (2, n, 8) and fused.rotary_table(n, memory[:8], 16)[:, :, 8:].tolist() == [
        [[1.0] * 8] * n, [[0.0] * 8] * n]  # padded pairs: cos 1, sin 0
    fused.rotary_table(n, memory[:8])
    memory[:8] *= 2  # in place: a new version
    assert not torch.equal(fused.rotary_table(n, memory[:8]), table)


def test_a_padded_head_dim_keeps_one_rotary_table(monkeypatch):
    """A head dim the kernels zero-pad (20 -> 32) builds its rotary table once per frequency tensor, not
    once per call."""
    monkeypatch.setattr(fused, "ROTARY_TABLES", {})
    freqs = 10000.0 ** (-torch.arange(0, 20, 2, dtype=torch.float32) / 20)
    q = torch.randn(1, 1, 40, 20)
    for _ in range(3):
        h_attention(q.to(DEVICE), q.to(DEVICE), q.to(DEVICE), block_size=16, impl="triton", rotary_freqs=freqs.to(DEVICE))
    assert len(fused.ROTARY_TABLES) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_take_head_interleaved_inputs(causal):
    """q, k, v as the layers make them: (B, N, H, D) memory seen as (B, H, N, D), q a slice of qkv."""
    gen = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 75, 3, 16
    qkv = torch.randn(b, n, 3 * h * d, dtype=torch.float64, generator=gen)
    mask = make_mask("gaps", b, n, gen)

    def run(impl, dtype):
        x = qkv.to(DEVICE, dtype).requires_grad_()
        q, k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in x.chunk(3, dim=-1))
        out = h_attention(q, k, v, block_size=16, causal=causal, key_padding_mask=mask.to(DEVICE), impl=impl)
        out.transpose(1, 2).flatten(2).pow(2).sum().backward()
        return out, x.grad

    got, got_grad = run("triton", torch.float32)
    exp, exp_grad = run("blocked", torch.float64)
    assert rel_err(got, exp) <= TOL[torch.float32]
    assert rel_err(got_grad, exp_grad) <= TOL[torch.float32]


@pytest.mark.parametrize("n,causal,mask_kind", [(75, True, "gaps"), (130, False, "start"), (64, True, "none")])
def test_packed_qkv_gets_its_gradient_as_one_tensor(n, causal, mask_kind):
    """h_attention_qkv on qkv (B, N, 3, H, D), rotary on: the output and qkv's gradient equal the float64
    blocked path's on q, k, v views of it, and the eager kernels hand back qkv's gradient themselves
    (their backward node feeds qkv directly: no stacking of dq, dk, dv in between)."""
    from h_transformer_1d.attention import h_attention_qkv

    gen = torch.Generator().manual_seed(11)
    b, h, d = 2, 3, 16
    qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64, generator=gen)
    grad = torch.randn(b, h, n, d, dtype=torch.float64, generator=gen)
    mask = make_mask(mask_kind, b, n, gen)
    mask = None if mask is None else mask.to(DEVICE)
    freqs = (10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEVICE)
    kw = {"block_size": 16, "causal": causal, "key_padding_mask": mask, "rotary_freqs": freqs}

    x = qkv.to(DEVICE, torch.float32).requires_grad_()
    got = h_attention_qkv(x, impl="triton", **kw)
    assert type(got.grad_fn).__name__ == "_EagerHAttentionQKVBackward"
    assert got.grad_fn.next_functions[0][0].variable is x
    got.backward(grad.to(DEVICE, torch.float32))

    y = qkv.to(DEVICE).requires_grad_()
    exp = h_attention(*(t.transpose(1, 2) for t in y.unbind(2)), impl="blocked", **kw)
    exp.backward(grad.to(DEVICE))
    assert not x.grad.isnan().any() and x.grad.shape == x.shape
    assert rel_err(got, exp) <= TOL[torch.float32] * 3
    assert rel_err(x.grad, y.grad) <= TOL[torch.float32] * 3


def test_packed_qkv_must_have_the_packed_shape():
    from h_transformer_1d.attention import h_attention_qkv

    expected = r"qkv must have shape \(batch, seq_len, 3, heads, dim_head\), got \(2, 5, 2, 3, 4\)"
    with pytest.raises(ValueError, match=expected):
        h_attention_qkv(torch.zeros(2, 5, 2, 3, 4), block_size=16)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        h_attention_qkv([1, 2, 3], block_size=16)


def test_launch_asks_the_autotuner_again_for_every_new_key(monkeypatch):
    """tk.launch: the autotuner picks a tile on the first launch per key; later launches with that key go
    straight to the chosen tile. A change of any constexpr (block size NR, head size D, ...), of the input
    dtype, of forced tiles or of tuning on/off is a new key, so a tile chosen for one never runs another."""
    kernel = tk.window_fwd_kernel
    tuned, direct = [], []

    def autotune(*args, grid, **consts):
        tuned.append(consts)
        kernel.best_config = triton.Config({"BLOCK_M": consts["NR"], "BLOCK_N": consts["NR"]})

    monkeypatch.setattr(tk, "CHOSEN_CONFIGS", {})
    monkeypatch.setattr(kernel, "best_config", None, raising=False)  # restored afterwards
    monkeypatch.setattr(kernel, "run", autotune)  # what kernel[grid](...) calls
    monkeypatch.setattr(kernel.fn, "run", lambda *args, grid, warmup, **kw: direct.append(kw))
    x32, x16 = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    consts = {"NR": 16, "D": 32, "CAUSAL": True}
    tk.launch(kernel, None, x32, **consts)
    tk.launch(kernel, None, x32, **consts)
    assert len(tuned) == 1 and len(direct) == 1
    assert direct[0].items() >= {**consts, "BLOCK_M": 16, "BLOCK_N": 16}.items()  # and the config's warps
    for changed in (dict(consts, NR=32), dict(consts, D=64), dict(consts, CAUSAL=False)):
        tk.launch(kernel, None, x32, **changed)
    tk.launch(kernel, None, x16, **consts)
    monkeypatch.setattr(tk, "FORCE_TILES", frozenset({(16, 16)}))
    tk.launch(kernel, None, x32, **consts)
    assert len(tuned) == 6 and len(direct) == 1
    tk.launch(kernel, None, x32, **dict(consts, NR=32))  # chosen before FORCE_TILES changed: a new key
    assert len(tuned) == 7
    monkeypatch.setattr(tk, "FORCE_TILES", frozenset())
    tk.launch(kernel, None, x32, **dict(consts, NR=32))
    assert len(tuned) == 7 and direct[-1]["BLOCK_M"] == 32
    tuning = tk.autotune_enabled()
    monkeypatch.setenv("H_TRANSFORMER_1D_AUTOTUNE", "1" if not tuning else "0")  # tuning switched
    tk.launch(kernel, None, x32, **dict(consts, NR=32))
    assert len(tuned) == 8


def test_fully_masked_sequence_gives_zeros():
    q, k, v = (torch.randn(2, 1, 40, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 40, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = h_attention(q, k, v, block_size=16, key_padding_mask=mask, impl="triton")
    assert out[1].abs().max() == 0 and not out.isnan().any()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_compiled_equals_eager_without_graph_breaks(monkeypatch):
    inputs = [torch.randn(1, 2, 70, 16, device=DEVICE) for _ in range(3)]
    grad = torch.randn(1, 2, 70, 16, device=DEVICE)
    freqs = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32, device=DEVICE) / 16)

    def fn(q, k, v):
        return h_attention(q, k, v, block_size=16, causal=True, impl="triton", rotary_freqs=freqs) * 2

    def run(f):  # output and input gradients
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = f(*leaves)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]

    eager, eager_grads = run(fn)  # through the autograd.Function
    monkeypatch.setattr(fused, "LAYOUT_TABLES", {})
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"  # no C++ toolchain needed on CPU
    compiled, compiled_grads = run(torch.compile(fn, fullgraph=True, backend=backend))  # through the custom ops
    # the compiled graph builds its layout tables itself: a cached tensor made during a CUDA graph's
    # warm-up would live in the graph's memory pool, which torch.compile(mode="reduce-overhead") rejects
    assert fused.LAYOUT_TABLES == {}
    assert rel_err(compiled, eager) <= 1e-6
    for name, a, e in zip("qkv", compiled_grads, eager_grads):  # inductor may round the rotary tables apart
        assert rel_err(a, e) <= 1e-5, f"d{name}"


def test_compiled_with_dynamic_lengths_equals_eager():
    """One graph for several lengths (dynamic shapes: the level layout is computed from a symbolic N)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    backend = CompileCounterWithBackend("inductor" if torch.cuda.is_available() else "aot_eager")

    def fn(q, k, v):
        return h_attention(q, k, v, block_size=16, causal=True, impl="triton")

    compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(7)
    compilations = []
    for n in (70, 100):
        inputs = [torch.randn(1, 2, n, 16, generator=gen).to(DEVICE) for _ in range(3)]
        grad = torch.randn(1, 2, n, 16, generator=gen).to(DEVICE)
        results = []
        for f in (compiled, fn):
            leaves = [t.clone().requires_grad_() for t in inputs]
            out = f(*leaves)
            out.backward(grad)
            results.append([out.detach(), *(t.grad for t in leaves)])
        for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
            assert rel_err(a, e) <= 1e-6, f"N {n}: {name}"
        compilations.append(backend.frame_count)
    assert compilations[1] == compilations[0] > 0  # both lengths have levels 0-2: no recompilation


@cuda
def test_cuda_graphs_replay_the_kernels():
    """torch.compile(mode="reduce-overhead") records the forward and backward launches in CUDA graphs
    and replays them: same outputs and gradients as eager calls, step after step."""
    gen = torch.Generator().manual_seed(5)
    shape = (2, 4, 1000, 64)
    freqs = (10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)).cuda()

    def fn(q, k, v):
        return h_attention(q, k, v, block_size=128, causal=True, impl="triton", rotary_freqs=freqs)

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        q, k, v, grad = (torch.randn(shape, generator=gen).cuda().bfloat16() for _ in range(4))
        results = []
        for f in (fn, compiled):
            torch.compiler.cudagraph_mark_step_begin()
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = f(*leaves)
            out.backward(grad)
            results.append([out.detach().clone(), *(t.grad for t in leaves)])
        for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
            assert rel_err(a, e) <= 1e-2, f"step {step}: {name}"


@pytest.mark.parametrize("n,nr", [(1, 16), (70, 16), (4097, 128), (65536, 512)])
def test_layout_tables(n, nr):
    """Per packed block, the block range of its level; per level, its first row and its rows; zeros past
    the top for the launches that read a few levels beyond it."""
    lengths = level_lengths(n, nr)
    layout = fused.packed_layout(n, nr)
    lo, hi, start, length = layout.split(fused.build_layout_tables(n, nr, "cpu"))
    assert lo.dtype == torch.int32 and layout.blocks == len(lo) == len(hi) == sum(lengths) // nr
    row = 0
    for level, rows in enumerate(lengths):
        assert start[level] == row == layout.starts[level] and length[level] == rows
        blocks = slice(row // nr, (row + rows) // nr)
        assert (lo[blocks] == row // nr).all() and (hi[blocks] == (row + rows) // nr).all()
        row += rows
    assert len(start) == len(length) == len(lengths) + max(tk.LV, tk.COARSEN_LV) + 1
    assert not start[len(lengths) :].any() and not length[len(lengths) :].any()


@pytest.mark.parametrize("rotary", [False, True])
def test_training_after_a_first_call_in_inference_mode(monkeypatch, rotary):
    """The cached layout and rotary tables made by a first call under torch.inference_mode (evaluation
    before training) are normal tensors: a later call with autograd saves them for backward."""
    monkeypatch.setattr(fused, "LAYOUT_TABLES", {})
    monkeypatch.setattr(fused, "ROTARY_TABLES", {})
    q = torch.randn(1, 2, 40, 16, device=DEVICE)
    freqs = (10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)).to(DEVICE) if rotary else None
    kw = {"block_size": 16, "causal": True, "impl": "triton", "rotary_freqs": freqs}
    with torch.inference_mode():
        expected = h_attention(q, q, q, **kw)
    leaf = q.clone().requires_grad_()
    out = h_attention(leaf, leaf, leaf, **kw)
    out.sum().backward()
    assert torch.equal(out.detach(), expected) and leaf.grad.isfinite().all()


@pytest.mark.parametrize("n,mask_kind,rotary", [(64, "none", True), (70, "gaps", False), (96, "end", True)])
def test_eager_path_equals_custom_ops(monkeypatch, n, mask_kind, rotary):
    """Eager calls skip the custom ops' dispatch (an autograd.Function around the same launches); both
    must hand the kernels the same arguments: equal outputs and gradients, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(2, 2, n, 16, generator=gen).to(DEVICE) for _ in range(4))
    mask = make_mask(mask_kind, 2, n, gen)
    freqs = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16) if rotary else None

    def run(via_custom_ops):
        monkeypatch.setattr(fused, "VIA_CUSTOM_OPS", via_custom_ops)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = h_attention(*leaves, block_size=16, causal=True, impl="triton",
                          key_padding_mask=None if mask is None else mask.to(DEVICE),
                          rotary_freqs=None if freqs is None else freqs.to(DEVICE))  # fmt: skip
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves)]

    for name, a, e in zip(("out", "dq", "dk", "dv"), run(False), run(True)):
        assert torch.equal(a, e), name


# ------------------------------------------------------------------ realistic sizes, GPU only

# every case compiles its own kernel variants (block size, head dim, causal, dtype): few, varied cases
GPU_CASES = [
    (1000, 16, False, "gaps", 64, torch.bfloat16),
    (1000, 256, True, "end", 32, torch.float16),
    (4097, 128, False, "start", 128, torch.float16),
    (4097, 64, True, "gaps", 64, torch.bfloat16),
    (65536, 128, False, "end", 64, torch.bfloat16),
    (65536, 128, True, "none", 64, torch.float16),
    (2100, 512, True, "end", 64, torch.bfloat16),  # the largest block the kernels take
    (5000, 512, False, "gaps", 64, torch.float16),
    (4096, 512, True, "none", 64, torch.bfloat16),  # uniform levels: the training tool's shape
    (8192, 256, False, "none", 64, torch.bfloat16),
    # head dims 32 to 256
    (3000, 64, True, "gaps", 256, torch.bfloat16),
    (4097, 128, False, "end", 256, torch.float16),
    (2048, 512, True, "none", 256, torch.bfloat16),
    (1500, 128, True, "start", 32, torch.bfloat16),
    (2000, 128, True, "gaps", 96, torch.bfloat16),  # padded to 128
    (1500, 64, False, "none", 80, torch.float16),
]


@cuda
@pytest.mark.parametrize("n,nr,causal,mask_kind,d,dtype", GPU_CASES)
def test_kernels_match_blocked_float64_on_gpu(n, nr, causal, mask_kind, d, dtype):
    # the float64 blocked path is itself checked against the dense reference (test_attention.py)
    check_against_reference(n, nr, causal, mask_kind, d, dtype, b=1, h=2, reference="blocked")


@cuda
@pytest.mark.parametrize("n,nr,causal", [(3000, 64, False), (2500, 128, True)])
def test_kernels_match_reference_on_gpu(n, nr, causal):
    check_against_reference(n, nr, causal, "gaps", 64, torch.bfloat16, b=2, h=2)


def test_launches_switch_to_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device: the forward and the backward launch under their
    inputs' device (a context only where that is not the current one)."""
    seen = []
    original = fused.launch_device
    monkeypatch.setattr(fused, "launch_device", lambda t: seen.append(t.shape) or original(t))
    q = torch.randn(1, 2, 40, 16, device=DEVICE, requires_grad=True)
    h_attention(q, q, q, block_size=16, causal=True, impl="triton").sum().backward()
    assert seen == [q.shape, q.shape]  # forward (q) and backward (the output gradient)

    class OnSecondGpu:  # what launch_device reads of a tensor
        is_cuda, device = True, torch.device("cuda:1")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = original(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert not isinstance(original(OnSecondGpu()), torch.cuda.device)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("compiled", [False, True])
def test_kernels_run_on_the_inputs_gpu_when_another_is_current(compiled):
    """Inputs on cuda:1 while cuda:0 is current (a model moved to a chosen GPU without set_device):
    Triton launches on the current device, so the launches must switch to the inputs' device."""
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(11)
    inputs = [torch.randn(2, 4, 1000, 64, generator=gen).bfloat16() for _ in range(4)]

    def fn(q, k, v):
        return h_attention(q, k, v, block_size=128, causal=True, impl="triton")

    results = {}
    for device in ("cuda:0", "cuda:1"):
        f = torch.compile(fn, fullgraph=True) if compiled else fn
        leaves = [t.to(device).requires_grad_() for t in inputs[:3]]
        out = f(*leaves)
        out.backward(inputs[3].to(device))
        torch.cuda.synchronize(device)
        results[device] = [t.cpu() for t in (out.detach(), *(x.grad for x in leaves))]
        assert torch.cuda.current_device() == 0
    for name, a, e in zip(("out", "dq", "dk", "dv"), results["cuda:1"], results["cuda:0"]):
        assert rel_err(a, e) <= 1e-2, name


def test_kernels_take_blocks_16_to_512_and_their_head_sizes():
    q = torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)
    assert fused.supports(q, 16) and fused.supports(q, 512)
    assert not fused.supports(q, 8) and not fused.supports(q, 1024)
    for d in (8, 48, 80, 96, 200):  # zero-padded to the next kernel width
        assert fused.supports(torch.empty(1, 1, 1, d, dtype=torch.bfloat16), 128), d
    assert not fused.supports(q.float(), 128) and fused.supports(q.float(), 128, allow_float32=True)
    for d in (16, 32, 128, 256):
        assert fused.supports(torch.empty(1, 1, 1, d, dtype=torch.float16), 128), d
    assert not fused.supports(torch.empty(1, 1, 1, 257, dtype=torch.float16), 128)
    assert [fused.kernel_head_dim(d) for d in (1, 16, 17, 48, 80, 128, 129, 256)] == [16, 16, 32, 64, 128, 128, 256, 256]


@pytest.mark.parametrize("tiles", [tk.FWD_TILES, tk.DQ_TILES, tk.BWD_TILES], ids=["forward", "dq", "dkdv"])
def test_wide_heads_take_narrower_tiles(monkeypatch, tiles):
    """Past head dim 128 only tiles within WIDE_HEAD_TILES remain (the others overflow registers or shared
    memory on the GPU), and at least one does at every block size; up to 128 the head dim prunes only the
    tiles marked with a narrower widest head."""
    monkeypatch.setenv("H_TRANSFORMER_1D_AUTOTUNE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU's tile lists, not the interpreter's
    gpu_configs = tk.tile_configs(tiles)
    for nr in (16, 64, 512):
        for d in (64, 128):
            expected = [c for c, t in zip(gpu_configs, tiles) if t[0] <= nr and t[1] <= nr and (t[4:] or [d])[0] >= d]
            assert tk.fit_block(gpu_configs, {}, NR=nr, D=d) == expected, (nr, d)
        narrow = tk.fit_block(gpu_configs, {}, NR=nr, D=128)
        wide = tk.fit_block(gpu_configs, {}, NR=nr, D=256)
        assert wide and set(wide) <= set(narrow) or nr == 16
        for c in wide:
            m, n = tk.tile_shape(c)[:2]
            assert m * 256 <= tk.WIDE_HEAD_TILES[0] and n * 256 <= tk.WIDE_HEAD_TILES[1]


def test_tile_configs_survive_the_autotuning_cache(monkeypatch):
    """Triton's autotuner keeps its choices on disk as each config's attributes and rebuilds the configs with
    `Config(**attributes)`: a config carrying anything else cannot be read back (every later process then fails
    on its first launch)."""
    import json

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for tiles in (tk.FWD_TILES, tk.DQ_TILES, tk.BWD_TILES):
        for config in tk.tile_configs(tiles):
            rebuilt = triton.Config(**json.loads(json.dumps(config.__dict__)))
            assert tk.tile_shape(rebuilt) == tk.tile_shape(config)


WIDE_TILES = sorted({tk.tile_shape(c) for c in tk.FWD_CONFIGS + tk.DQ_CONFIGS + tk.BWD_CONFIGS if tk.fits_head(c, 256)})


@cuda
@pytest.mark.parametrize("tiles", WIDE_TILES, ids=["x".join(map(str, t)) for t in WIDE_TILES])
def test_every_wide_head_tile_on_gpu(monkeypatch, tiles):
    """Each tile autotuning may choose at head dim 256 compiles and is exact (a tile past the GPU's
    registers or shared memory fails to launch)."""
    monkeypatch.setenv("H_TRANSFORMER_1D_AUTOTUNE", "0")
    force_tiles(monkeypatch, tiles)
    check_against_reference(1100, 128, True, "gaps", 256, torch.bfloat16, b=2, h=2)


@cuda
def test_auto_dispatch_uses_kernels_on_gpu(monkeypatch):
    calls = []
    original = fused.fused_h_attention
    monkeypatch.setattr(fused, "fused_h_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q = torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16)
    h_attention(q, q, q, block_size=64)
    assert calls
