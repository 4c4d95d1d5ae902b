"""`bench`: a few training steps on random bytes per attention kind; tokens/s and peak memory.

Only what changes the time of a step is a flag of `bench`: the model, the batch (--batch-size, --grad-accum),
dropout (a non-zero attention dropout leaves the fused kernels) and the system flags.
"""

import dataclasses
import resource
import time

import torch

from .config import NUM_TOKENS, Config, build_model, validate
from .core.runtime import Runtime
from .core.training import adamw

UNTIMED_STEPS = 2  # compilation, allocator warm-up
# the Config fields besides the model's that change the time of a step: bench's flags
BENCH_FLAGS = ("batch_size", "grad_accum", "dropout", "attn_dropout", "device", "precision", "compile")


def peak_memory_mib(rt: Runtime) -> float:
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def training_step(cfg: Config, rt: Runtime):
    """One optimizer step of `cfg`'s model (compiled with cfg.compile) on a fixed batch of random bytes,
    as a function returning the last micro-batch's loss (not waited for); the model is `step.model`."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(rt.device)
    if cfg.compile:
        model.net.compile()
    optimizer = adamw(list(model.parameters()), lr=cfg.lr)
    micro = torch.randint(NUM_TOKENS, (cfg.batch_size // cfg.grad_accum, cfg.seq_len + 1), device=rt.device)

    def step() -> torch.Tensor:
        for _ in range(cfg.grad_accum):
            with rt.autocast():
                loss = model(micro) / cfg.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step.model = model
    return step


def bench_one(cfg: Config, steps: int, rt: Runtime) -> tuple[float, float, float]:
    """(ms per step, tokens per second, peak MiB) of `steps` optimizer steps of `cfg` (after
    UNTIMED_STEPS)."""
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    step = training_step(cfg, rt)
    for i in range(UNTIMED_STEPS + steps):
        if i == UNTIMED_STEPS:
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
            start = time.perf_counter()
        loss = step()
    loss.item()  # waits for the device
    seconds = (time.perf_counter() - start) / steps
    return seconds * 1e3, cfg.batch_size * cfg.seq_len / seconds, peak_memory_mib(rt)


def bench(cfg: Config, kinds: tuple[str, ...], steps: int, rt: Runtime) -> list[dict]:
    validate(cfg)
    num_params = sum(p.numel() for p in build_model(cfg).parameters())
    memory = "peak allocated" if rt.device.type == "cuda" else "peak RSS of the process"
    print(
        f"bench: {num_params / 1e6:.2f}M parameters, batch {cfg.batch_size} x {cfg.seq_len} tokens"
        f"{f' in {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''}, {rt.device} "
        f"({'bf16 autocast' if rt.bf16 else 'fp32'}{', compiled' if cfg.compile else ''}), "
        f"{steps} timed steps after {UNTIMED_STEPS}"
    )
    print(f"{'attention':<14}{'ms/step':>10}{'tokens/s':>12}{'memory MiB':>12}  ({memory})")
    rows = []
    for kind in kinds:
        ms, tokens_per_s, mib = bench_one(dataclasses.replace(cfg, attention=kind), steps, rt)
        rows.append({"attention": kind, "ms_per_step": ms, "tokens_per_s": tokens_per_s, "peak_mib": mib})
        print(f"{kind:<14}{ms:>10.1f}{tokens_per_s:>12,.0f}{mib:>12,.0f}", flush=True)
    speed = {r["attention"]: r["tokens_per_s"] for r in rows}
    if len(speed) == 2:
        print(f"hierarchical / dense tokens/s: {speed['hierarchical'] / speed['dense']:.2f}x")
    return rows
