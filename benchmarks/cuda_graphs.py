"""Training steps eager, torch.compile'd, and compiled with CUDA graphs (mode "reduce-overhead"):
dense attention (SDPA) against hierarchical attention, in one process on one GPU.

    PYTHONPATH=. python benchmarks/cuda_graphs.py                 # preset base, context 4,096, batch 8
    PYTHONPATH=. python benchmarks/cuda_graphs.py --steps 5 --context 1024 --out-dir /tmp/cg

CUDA graphs replay a step's kernels without the CPU issuing them one by one, so a step takes about its
GPU time: what is left of a step's wall time beyond its kernels is host time. Every configuration
trains the same model (`--preset`, bf16 autocast, AdamW, gradient clipping) on one fixed batch of
random bytes: --steps timed steps after 3 untimed ones (compilation, graph recording). A configuration
that fails is reported with its error, and the others still run.

Writes cuda_graphs.{md,json,png} to --out-dir (default benchmarks/results) after every configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
from scaling import (
    environment,
    fmt,
    pyplot,
    save_figure,
    script_command,
    sdpa_kernels_or_error,
    sdpa_line,
    write_json,
    write_text,
)
from tqdm import tqdm

from h_transformer_1d.apps.config import NUM_TOKENS, PRESETS, build_model
from h_transformer_1d.apps.train import adamw

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODES = ("eager", "default", "reduce-overhead")
UNTIMED = 3  # compilation, the graphs' warm-up and recording


def attentions(blocks: list[int]) -> list[tuple[str, int | None]]:
    return [("dense", None)] + [("hierarchical", b) for b in blocks]


def label(attention: str, block: int | None) -> str:
    return "dense (SDPA)" if attention == "dense" else f"hierarchical, block {block}"


def time_steps(cfg, mode: str, steps: int) -> dict:
    """ms per optimizer step of cfg's model (mode: eager or a torch.compile mode) and the last loss."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if mode != "eager":
        model.net.compile(mode=mode)
    optimizer = adamw(list(model.parameters()), lr=1e-4)  # as the training tool: fused on a GPU
    batch = torch.randint(NUM_TOKENS, (cfg.batch_size, cfg.seq_len + 1), device=device)

    def step() -> torch.Tensor:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().clone()

    start = time.perf_counter()
    for _ in range(UNTIMED):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final = loss.item()  # waits for the device
    ms = (time.perf_counter() - start) / steps * 1e3
    return {"ms_per_step": ms, "tokens_per_s": cfg.batch_size * cfg.seq_len / ms * 1e3, "loss": final,
            "warmup_s": warm}  # fmt: skip


def report(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    lines = [
        "# Training steps with CUDA graphs: dense vs hierarchical attention",
        "",
        f"Card: **{meta['card']}**; torch {meta['torch']}; triton {meta['triton']}; git {meta['git']}; {meta['date']}.",
        sdpa_line(meta.get("sdpa")),
        f"Command: `{meta['command']}`"
        + (" (H_TRANSFORMER_1D_AUTOTUNE=0: the kernels' default tiles)." if meta.get("autotune") == "0" else "."),
        (
            f"Model: preset `{meta['preset']}` ({meta['params'] / 1e6:.2f}M parameters), context {meta['context']:,}, "
            f"batch {meta['batch']}, bf16 autocast, AdamW; {meta['steps']} timed steps after {UNTIMED} "
            "(one process; wall time per step)."
        ),
        "",
        "| attention | mode | ms/step | tokens/s | vs dense, same mode | vs dense eager | loss after the steps |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    dense = {r["mode"]: r.get("ms_per_step") for r in rows if r["attention"] == "dense"}
    for r in rows:
        ms = r.get("ms_per_step")
        if ms is None:
            error = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {label(r['attention'], r['block'])} | {r['mode']} | failed: {error} | | | | |")
            continue
        same = dense.get(r["mode"])
        lines.append(
            f"| {label(r['attention'], r['block'])} | {r['mode']} | {ms:.1f} | {fmt(r['tokens_per_s'])} | "
            f"{fmt(same / ms if same else None, '.2f')}{'x' if same else ''} | "
            f"{fmt(dense['eager'] / ms if dense.get('eager') else None, '.2f')}{'x' if dense.get('eager') else ''} | "
            f"{r['loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    plt = pyplot()
    rows = data["rows"]
    names = list(dict.fromkeys(label(r["attention"], r["block"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(MODES)
    for i, mode in enumerate(MODES):
        values = {label(r["attention"], r["block"]): r.get("ms_per_step") for r in rows if r["mode"] == mode}
        xs = [j + (i - (len(MODES) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [values.get(n) or 0 for n in names], width, label=mode)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms per training step (lower is better)")
    meta = data["meta"]
    ax.set_title(f"{meta['card']}: context {meta['context']:,}, batch {meta['batch']}", fontsize=10)
    ax.legend(title="mode", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs="+", default=[512, 256], help="hierarchical block sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--out-dir", type=os.path.abspath, default=str(RESULTS_DIR))
    args = parser.parse_args()
    for flag in ("context", "batch", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be an integer >= 1, got {getattr(args, flag)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (CUDA graphs); this machine has none")
    out = Path(args.out_dir)
    base = PRESETS[args.preset]
    data = {"meta": {**environment("cuda"), "command": script_command(), "preset": args.preset,
                     "context": args.context, "batch": args.batch, "steps": args.steps,
                     "autotune": os.environ.get("H_TRANSFORMER_1D_AUTOTUNE", "1"),
                     "params": sum(p.numel() for p in build_model(base).parameters())},
            "rows": []}  # fmt: skip
    data["meta"]["sdpa"] = sdpa_kernels_or_error(args.batch, base.heads, args.context, base.dim_head)
    configs = [(a, b, m) for a, b in attentions(args.blocks) for m in MODES]
    for attention, block, mode in tqdm(configs, desc="configurations"):
        cfg = dataclasses.replace(base, seq_len=args.context, batch_size=args.batch, attention=attention,
                                  block_size=block or base.block_size)  # fmt: skip
        row = {"attention": attention, "block": block, "mode": mode}
        try:
            row.update(time_steps(cfg, mode, args.steps))
        except Exception as error:  # noqa: BLE001 (a mode that fails is a result too)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        tqdm.write(str(row))
        data["rows"].append(row)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        write_json(out / "cuda_graphs.json", data)
        write_text(out / "cuda_graphs.md", report(data))
        plot(data, out / "cuda_graphs.png")
    print(f"wrote {out / 'cuda_graphs.md'}")


if __name__ == "__main__":
    main()
