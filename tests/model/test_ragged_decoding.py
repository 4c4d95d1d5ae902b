"""Decoding a batch of prompts of different lengths: each row's logits and tokens against that row alone
(the model's full forward, or generate on the row by itself)."""

import pytest
import torch

from h_transformer_1d import AutoregressiveWrapper, HTransformer1D
from h_transformer_1d.model.cache import StaticDecoder, decode_step, prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton step: compiled, or interpreted on the CPU

MODEL = {"num_tokens": 29, "dim": 32, "depth": 2, "max_seq_len": 64, "causal": True, "heads": 2, "dim_head": 8}


def model(block_size, **kw):
    return HTransformer1D(**{**MODEL, "block_size": block_size, **kw}).double().eval()


def right_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    tokens = torch.full((len(rows), max(len(row) for row in rows)), 7, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens


@pytest.mark.parametrize("block_size", [4, 8])
@pytest.mark.parametrize("options", [{}, {"shift_tokens": True, "reversible": True, "kv_heads": 1}])
def test_each_row_decodes_as_alone(block_size, options):
    """Lengths 1, 3, block - 1, block + 1, 13, then 40 steps (levels up to 3 and 2): every position's logits,
    prompt and decoded, equal the full forward of the row's own tokens."""
    net = model(block_size, **options)
    lengths, steps = [1, 3, block_size - 1, block_size + 1, 13], 40
    sequences = [torch.randint(0, 29, (length + steps,)) for length in lengths]
    with torch.no_grad():
        logits, cache = prefill(net, right_padded([s[:n] for s, n in zip(sequences, lengths)]), lengths=lengths)
        decoded = []
        for step in range(steps):
            decoded.append(decode_step(net, cache, torch.stack([s[n + step] for s, n in zip(sequences, lengths)])))
        assert cache.positions.tolist() == [n + steps for n in lengths]
        for row, (sequence, length) in enumerate(zip(sequences, lengths)):
            full = net(sequence[None])[0]
            torch.testing.assert_close(logits[row, :length], full[:length], rtol=0, atol=1e-9)
            torch.testing.assert_close(torch.stack([d[row] for d in decoded]), full[length:], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kernel", [False, True])
def test_static_decoder_steps_each_row_as_alone(kernel):
    """StaticDecoder from a prefill of different lengths (on a GPU: a CUDA graph), the attention steps in
    PyTorch or through the Triton step: logits against each row's full forward."""
    if kernel:
        pytest.importorskip("triton")
    net = model(4, shift_tokens=True, kv_heads=1, depth=1 if kernel else 2).to(DEVICE)
    lengths, steps = [1, 6, 3], 11 if kernel else 36  # up to level 2 (the interpreter is slow)
    sequences = [torch.randint(0, 29, (length + steps,), device=DEVICE) for length in lengths]
    with torch.no_grad():
        _, cache = prefill(net, right_padded([s[:n] for s, n in zip(sequences, lengths)]).to(DEVICE), lengths=lengths)
        decoder = StaticDecoder(net, cache, max(lengths) + steps, kernel=kernel)
        decoded = []
        for step in range(steps):
            decoded.append(decoder.step(torch.stack([s[n + step] for s, n in zip(sequences, lengths)])).clone())
        for row, (sequence, length) in enumerate(zip(sequences, lengths)):
            full = net(sequence[None])[0]
            torch.testing.assert_close(torch.stack([d[row] for d in decoded]), full[length:], rtol=0, atol=1e-9)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_continues_each_prompt_as_alone(use_cache):
    """max_seq_len 16 and a prompt of 20: the cached path keeps the whole context, the recomputing one
    windows each row by itself; either way a row's tokens are those it gets alone."""
    wrapper = AutoregressiveWrapper(model(4, max_seq_len=16, shift_tokens=True))
    rows = [torch.randint(0, 29, (n,)) for n in (1, 3, 5, 13, 20)]
    out = wrapper.generate(rows, 10, temperature=0.0, use_cache=use_cache)
    assert out.shape == (5, 10)
    alone = torch.stack([wrapper.generate(row, 10, temperature=0.0, use_cache=use_cache) for row in rows])
    assert torch.equal(out, alone)
    lengths = torch.tensor([len(row) for row in rows])
    padded = wrapper.generate(right_padded(rows), 10, temperature=0.0, lengths=lengths, use_cache=use_cache)
    assert torch.equal(padded, out)


def test_generate_of_equal_lengths_is_the_batch_path():
    wrapper = AutoregressiveWrapper(model(4))
    prompt = torch.randint(0, 29, (3, 6))
    expected = wrapper.generate(prompt, 12, temperature=0.0)
    assert torch.equal(wrapper.generate(list(prompt), 12, temperature=0.0), expected)
    padded = torch.cat([prompt, torch.zeros(3, 2, dtype=prompt.dtype)], 1)
    assert torch.equal(wrapper.generate(padded, 12, temperature=0.0, lengths=[6, 6, 6]), expected)


def test_generate_stops_each_row_at_eos():
    wrapper = AutoregressiveWrapper(model(4), pad_value=0)
    rows = [torch.randint(1, 29, (n,)) for n in (2, 9)]
    free = wrapper.generate(rows, 20, temperature=0.0)
    eos = int(free[1, 3])
    out = wrapper.generate(rows, 20, temperature=0.0, eos_token=eos)
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 20
        assert torch.equal(out[row, :stop], free[row, :stop]) and not out[row, stop:].any()


def test_ragged_prompts_are_checked():
    wrapper = AutoregressiveWrapper(model(4))
    rows = [torch.randint(0, 29, (n,)) for n in (2, 5)]
    padded = right_padded(rows)
    with pytest.raises(ValueError, match="either mask"):
        wrapper.generate(padded, 3, lengths=[2, 5], mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="takes no lengths"):
        wrapper.generate(rows, 3, lengths=[2, 5])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        wrapper.generate([rows[0], rows[1][:0]], 3)
    with pytest.raises(ValueError, match="at least 1"):
        wrapper.generate(padded, 3, lengths=[0, 5])
    with pytest.raises(ValueError, match="one entry per prompt row"):
        wrapper.generate(padded, 3, lengths=[2])
    with pytest.raises(ValueError, match=r"\(batch, T\) tensor"):
        wrapper.generate(padded[0], 3, lengths=[2])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs"):
            wrapper.generate(rows, 3, cuda_graph=True)
    net = wrapper.net
    with pytest.raises(ValueError, match="either mask or lengths"):
        prefill(net, padded, mask=torch.ones(2, 5, dtype=torch.bool), lengths=[2, 5])
    with pytest.raises(ValueError, match="at least 1"):
        prefill(net, padded, lengths=[0, 5])
    _, cache = prefill(net, padded, lengths=[2, 5])
    with pytest.raises(ValueError, match="capacity must be an int above the prompt length 5"):
        StaticDecoder(net, cache, 5, graph=False)
