"""Where the time goes: CUDA kernel and CPU-side breakdown of one attention layer / the attention core.

    PYTHONPATH=. python benchmarks/profile_gpu.py [--n 131072] [--causal] [--what layer|core|model]
        [--batch 1] [--block-size 128] [--attention hierarchical|dense]

For example, the training tool's `base` model at context 4,096 (32,768 tokens per step):

    PYTHONPATH=. python benchmarks/profile_gpu.py --what model --causal --n 4096 --batch 8 --block-size 512

Prints torch.profiler tables (top kernels by CUDA time, top ops by CPU time) of a few forward+backward
steps after warm-up, and the wall time per step with and without waiting for the GPU (when the two
agree, the GPU is busy; when the CPU time per step is the larger, launches are the bottleneck).
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile


def build(what: str, n: int, causal: bool, batch: int = 1, block_size: int = 128, attention: str = "hierarchical"):
    from h_transformer_1d import HTransformer1D, h_attention
    from h_transformer_1d.model.layers import CausalHAttention1D, HAttention1D

    if what == "core":
        q, k, v = (torch.randn(batch, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn_like(q)
        if attention == "dense":
            return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
        return lambda: h_attention(q, k, v, block_size=block_size, causal=causal).backward(grad)
    if what == "layer":
        layer = (CausalHAttention1D if causal else HAttention1D)(512, heads=8, dim_head=64, block_size=block_size).cuda()
        x = torch.randn(batch, n, 512, device="cuda", requires_grad=True)
        grad = torch.randn(batch, n, 512, device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            out.backward(grad)

        return step
    model = HTransformer1D(num_tokens=256, dim=512, depth=12, max_seq_len=n, causal=causal, heads=8, dim_head=64,
                           block_size=block_size, shift_tokens=True, attention=attention).cuda()
    tokens = torch.randint(0, 256, (batch, n), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), tokens).backward()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--what", choices=["core", "layer", "model"], default="layer")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--attention", choices=["hierarchical", "dense"], default="hierarchical")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    if args.attention == "dense" and args.what == "layer":
        p.error("--attention dense: the layer is hierarchical only; profile dense with --what core or --what model")
    step = build(args.what, args.n, args.causal, args.batch, args.block_size, args.attention)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    cpu_ms = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / reps * 1e3
    print(f"{args.what} {args.attention} B={args.batch} N={args.n} block={args.block_size} causal={args.causal} "
          f"on {torch.cuda.get_device_name()}: "
          f"{wall_ms:.3f} ms per step (GPU synchronised), {cpu_ms:.3f} ms of CPU issuing per step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
