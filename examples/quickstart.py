"""Quickstart: the seed README example, then a tiny causal model learning a byte sequence on the CPU.

    python examples/quickstart.py            # a few minutes on a 2-core CPU
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from h_transformer_1d import AutoregressiveWrapper, HTransformer1D


def seed_readme_example() -> None:
    model = HTransformer1D(
        num_tokens=256,
        dim=512,
        depth=12,
        causal=False,
        max_seq_len=8192,
        heads=8,
        dim_head=64,
        block_size=128,
        reversible=True,
        shift_tokens=True,
    )
    x = torch.randint(0, 256, (1, 8000))
    mask = torch.ones((1, 8000)).bool()
    with torch.no_grad():
        logits = model(x, mask=mask)
    print(f"seed README example: logits {tuple(logits.shape)}")


def train_tiny(steps: int = 100, seq_len: int = 256) -> None:
    torch.manual_seed(0)
    text = (Path(__file__).read_bytes() * 4)[: 64 * 1024]
    data = torch.tensor(list(text), dtype=torch.long)
    model = HTransformer1D(
        num_tokens=256, dim=128, depth=2, max_seq_len=seq_len, causal=True, heads=4, dim_head=32, block_size=16
    )
    wrapper = AutoregressiveWrapper(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="tiny model")
    for step in bar:
        idx = torch.randint(0, len(data) - seq_len - 1, (8,))
        batch = torch.stack([data[i : i + seq_len + 1] for i in idx])
        loss = wrapper(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 25 == 0 or step == steps - 1:
            tqdm.write(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f}s)")
    prompt = data[:32][None]
    sample = wrapper.generate(prompt, 64, temperature=0)
    print("greedy sample:", bytes(sample[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    seed_readme_example()
    train_tiny()
