"""Layers, the HTransformer1D model, reversible layers and the autoregressive wrapper."""

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch.autograd.graph import saved_tensors_hooks

from h_transformer_1d import AutoregressiveWrapper, CausalHAttention1D, HAttention1D, HTransformer1D


def tiny_model(**kw):
    args = {"num_tokens": 32, "dim": 32, "depth": 2, "max_seq_len": 256, "heads": 2, "dim_head": 16, "block_size": 4}
    args.update(kw)
    return HTransformer1D(**args).double()


def test_seed_readme_example_runs_unchanged():
    model = HTransformer1D(
        num_tokens = 256,          # number of tokens
        dim = 512,                 # dimension
        depth = 12,                # depth
        causal = False,            # autoregressive or not
        max_seq_len = 8192,        # maximum sequence length
        heads = 8,                 # heads
        dim_head = 64,             # dimension per head
        block_size = 128,          # block size
        reversible = True,         # use reversibility, to save on memory with increased depth
        shift_tokens = True        # whether to shift half the feature space by one along the sequence dimension, for faster convergence (experimental feature)
    )

    x = torch.randint(0, 256, (1, 8000))   # variable sequence length
    mask = torch.ones((1, 8000)).bool()    # variable mask length

    # network will automatically pad to power of 2, do hierarchical attention, etc

    logits = model(x, mask = mask) # (1, 8000, 256)
    assert logits.shape == (1, 8000, 256)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("layer_class", [HAttention1D, CausalHAttention1D])
def test_layer_matches_reference_attention(layer_class):
    torch.manual_seed(0)
    layer = layer_class(24, heads=3, dim_head=8, block_size=4).double()
    x = torch.randn(2, 45, 24, dtype=torch.float64)
    mask = torch.rand(2, 45) > 0.2
    q, k, v = layer.project_qkv(x, torch.arange(45))
    from h_transformer_1d import h_attention

    attn = h_attention(q, k, v, block_size=4, causal=layer.causal, key_padding_mask=mask, impl="reference")
    expected = layer.to_out(attn.transpose(1, 2).flatten(2))
    assert rel_err(layer(x, mask=mask), expected) <= 1e-12


def test_rotary_acts_on_queries_and_keys_only():
    layer = HAttention1D(16, heads=2, dim_head=8, block_size=4).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    q, k, v = layer.project_qkv(x, torch.arange(10))
    q0, k0, v0 = layer.to_qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    assert torch.equal(v, v0)
    assert torch.allclose(q[:, :, 0], q0[:, :, 0]) and not torch.allclose(q[:, :, 1:], q0[:, :, 1:])
    # rotation preserves norms and makes scores depend on relative position only
    assert torch.allclose(q.norm(dim=-1), q0.norm(dim=-1))
    shifted_q = layer.rotary(q0, torch.arange(10) + 5)
    shifted_k = layer.rotary(k0, torch.arange(10) + 5)
    assert torch.allclose(q @ k.transpose(-1, -2), shifted_q @ shifted_k.transpose(-1, -2))


@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize(
    "causal,dim,n,masked", [(True, 9, 7, True), (False, 11, 5, True), (False, 8, 1, False), (True, 6, 1, False)]
)
def test_token_shift_moves_the_slices_and_gets_the_adjoint_gradient(causal, dim, n, masked, compiling, monkeypatch):
    """shift_tokens against its definition written out position by position (the slices of
    tensor_split: from the previous position, [non-causal: from the next,] kept), and gradcheck;
    both ways of computing it (one autograd node eagerly, plain ops under torch.compile)."""
    from h_transformer_1d.model.layers import shift_tokens

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, n, dim, dtype=torch.float64, generator=gen)
    mask = torch.rand(2, n, generator=gen) > 0.3 if masked else None
    got = shift_tokens(x, mask, causal)
    src = x if mask is None else x * mask[..., None]
    chunks = src.tensor_split(2 if causal else 3, dim=-1)
    exp = torch.zeros_like(x)
    lo = 0
    for chunk, amount in zip(chunks, (1, 0) if causal else (1, -1, 0)):
        hi = lo + chunk.shape[-1]
        for t in range(n):
            if 0 <= t - amount < n:
                exp[:, t, lo:hi] = chunk[:, t - amount]
        lo = hi
    assert torch.equal(got, exp)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: shift_tokens(x, mask, causal), (x,))
    # torch.func goes through it: per-sample gradients of a weighted sum equal autograd's, sample by sample
    weight = torch.randn(n, dim, dtype=torch.float64, generator=gen)

    def loss(t):
        return (shift_tokens(t[None], None, causal)[0] * weight).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(x.detach())
    one_by_one = [torch.autograd.grad(loss(t), t)[0] for t in x.detach().requires_grad_()]
    assert torch.equal(per_sample, torch.stack(one_by_one))


@pytest.mark.parametrize("shift_tokens", [False, True])
def test_causal_model_never_looks_ahead_and_sees_all_of_the_past(shift_tokens):
    model = tiny_model(causal=True, shift_tokens=shift_tokens, depth=1)
    n = 120
    x = torch.randint(0, 32, (1, n))
    emb = model.token_emb(x).detach().requires_grad_()
    h = model.to_logits(model.layers(emb))
    for i in (0, 9, 63, 119):
        (grad,) = torch.autograd.grad(h[0, i].sum(), emb, retain_graph=True)
        reach = grad[0].abs().amax(-1)
        assert (reach[i + 1 :] == 0).all(), "depends on the future"
        assert (reach[: i + 1] > 0).all(), "misses part of the past"


@pytest.mark.parametrize("causal", [False, True])
def test_padded_tokens_do_not_change_real_logits(causal):
    model = tiny_model(causal=causal, shift_tokens=True).eval()
    x = torch.randint(0, 32, (2, 70))
    mask = torch.rand(2, 70) > 0.3
    mask[:, 0] = True
    other = torch.where(mask, x, torch.randint(0, 32, x.shape))
    a, b = model(x, mask=mask), model(other, mask=mask)
    assert rel_err(a[mask], b[mask]) <= 1e-12


def saved_activation_bytes(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


def test_reversible_activation_memory_does_not_grow_with_depth():
    x = torch.randint(0, 32, (1, 256))
    rev = [saved_activation_bytes(tiny_model(depth=d, reversible=True), x) for d in (1, 4, 8)]
    plain = [saved_activation_bytes(tiny_model(depth=d), x) for d in (1, 4, 8)]
    assert rev[2] == rev[0]
    assert plain[2] > 4 * plain[0] and plain[2] > 5 * rev[2]


@pytest.mark.parametrize("causal", [False, True])
def test_reversible_gradients_equal_plain_autograd(causal):
    torch.manual_seed(1)
    model = tiny_model(causal=causal, reversible=True, shift_tokens=True, depth=3, attn_dropout=0.1, ff_dropout=0.1)
    x = torch.randint(0, 32, (2, 50))
    mask = torch.rand(2, 50) > 0.2

    torch.manual_seed(7)
    model(x, mask=mask).pow(2).mean().backward()
    reversible_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    # the same two-stream computation, through ordinary autograd, same dropout draws
    torch.manual_seed(7)
    h = model.token_emb(x)
    x1, x2 = h, h
    for block in model.layers.blocks:
        x1, x2 = block(x1, x2, mask=mask)
    model.to_logits((x1 + x2) / 2).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert rel_err(reversible_grads[name], p.grad) <= 1e-10, name


def test_reversible_backward_recomputes_under_the_forwards_autocast():
    """The layers recomputed in the backward run at the autocast precision of the forward (autocast is
    thread-local and off where the autograd engine runs the backward), with gradients equal to the
    plain two-stream computation's under the same autocast."""
    torch.manual_seed(2)
    model = tiny_model(causal=True, reversible=True, shift_tokens=True, depth=2).float()
    x = torch.randint(0, 32, (2, 40))
    seen = []
    hooks = [
        block.f.fn.to_qkv.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        for block in model.layers.blocks
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    forward_dtypes = list(seen)
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert forward_dtypes == [torch.bfloat16] * 2
    assert seen[2:] == [torch.bfloat16] * 2  # the recomputations in the backward
    reversible_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.token_emb(x)
        x1, x2 = h, h
        for block in model.layers.blocks:
            x1, x2 = block(x1, x2)
        loss = model.to_logits((x1 + x2) / 2).float().pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert rel_err(reversible_grads[name], p.grad) <= 0.05, name  # bf16 reconstruction of the inputs


def test_small_model_learns_a_repeating_sequence():
    torch.manual_seed(0)
    model = HTransformer1D(num_tokens=16, dim=32, depth=2, max_seq_len=64, causal=True, heads=2, dim_head=16,
                           block_size=8)
    wrapper = AutoregressiveWrapper(model)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    data = pattern.repeat(20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = wrapper(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]


def test_wrapper_loss_ignores_padded_targets():
    model = tiny_model(causal=True)
    wrapper = AutoregressiveWrapper(model)
    x = torch.randint(0, 32, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 30:] = False
    loss = wrapper(x, mask=mask)
    logits = model(x[:, :-1], mask=mask[:, :-1])
    target = x[:, 1:].masked_fill(~mask[:, 1:], -100)
    assert torch.allclose(loss, F.cross_entropy(logits.transpose(1, 2), target))


def test_generate_batch_greedy_and_sampling():
    torch.manual_seed(0)
    wrapper = AutoregressiveWrapper(tiny_model(causal=True, max_seq_len=32))
    prompt = torch.randint(0, 32, (3, 5))
    greedy = wrapper.generate(prompt, 40, temperature=0)  # runs past max_seq_len with a window
    assert greedy.shape == (3, 40) and greedy.dtype == prompt.dtype
    assert torch.equal(greedy, wrapper.generate(prompt, 40, temperature=0))
    # greedy equals the argmax of a full forward, token by token
    seq = torch.cat([prompt, greedy[:, :10]], 1)
    assert torch.equal(wrapper.net(seq[:, :-1]).argmax(-1)[:, 4:], greedy[:, :10])
    sampled = wrapper.generate(prompt[0], 10, top_k=3, top_p=0.9)
    assert sampled.shape == (10,) and ((sampled >= 0) & (sampled < 32)).all()
    assert wrapper.net.training, "generate must restore training mode"


def test_generate_stops_at_eos_and_pads_after_it():
    wrapper = AutoregressiveWrapper(tiny_model(causal=True))
    prompt = torch.randint(0, 32, (2, 4))
    first = wrapper.generate(prompt, 1, temperature=0)[:, 0]
    out = wrapper.generate(prompt, 6, temperature=0, eos_token=int(first[0]))
    assert out[0, 0] == first[0] and (out[0, 1:] == wrapper.pad_value).all()


def test_top_k_and_top_p_filtering():
    from h_transformer_1d.model.autoregressive import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.1))[0].tolist() == [True, False, False, False]
