"""The language model's training loop, and the evaluation and sampling that evaluate and generate share.

Several processes: `torchrun --nproc_per_node K -m h_transformer_1d train ...`. Each process draws the
same global batch (it depends on seed and step only) and takes its own rows of each micro-batch, so
the gradient of a step is the one of a single process with the same --batch-size. Process 0 alone
prints, logs and writes checkpoints.
"""

import math
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data
from .config import LM, Config, ConfigError, build_model, validate
from .core import checkpoint
from .core.metrics import MetricsLog
from .core.plots import plot_curves
from .core.runtime import Runtime, start_runtime, stop_runtime
from .core.training import (
    PendingLoss,
    adamw,
    check_finite,
    decay_groups,
    finished,
    format_duration,
    progress_bar,
    restore_training_state,
    save_checkpoint,
    start_clean,
    warmup_cosine,
)

COLUMNS = ("step", "tokens", "lr", "train_bpb", "val_bpb", "tokens_per_s", "elapsed_s")
SCALARS = ("lr", "train_bpb", "val_bpb", "tokens_per_s")  # the columns mirrored to TensorBoard
LN2 = math.log(2)


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warmup to --lr, then cosine decay to lr/10 at --steps (steps count from 1)."""
    return warmup_cosine(step, cfg.lr, cfg.warmup_steps, cfg.steps)


@torch.no_grad()
def evaluate_bpb(
    model,
    tokens: torch.Tensor,
    starts: torch.Tensor,
    seq_len: int,
    batch_size: int,
    rt: Runtime,
    progress: bool = False,
) -> float:
    """Bits per byte of next-byte prediction over the windows at `starts`, shared out over processes."""
    was_training = model.training
    model.eval()
    nats, predicted = torch.zeros((), dtype=torch.float64, device=rt.device), 0
    mine = starts.tensor_split(rt.world_size)[rt.rank]
    for chunk in tqdm(mine.split(batch_size), desc="evaluating", disable=not (progress and rt.is_main), leave=False):
        x = data.windows(tokens, chunk, seq_len).to(rt.device).long()
        with rt.autocast():
            loss = model(x)  # mean over the x[:, 1:] targets
        nats += loss.double() * x[:, 1:].numel()
        predicted += x[:, 1:].numel()
    model.train(was_training)
    totals = rt.all_sum(torch.stack([nats, torch.tensor(float(predicted), dtype=torch.float64, device=rt.device)]))
    return (totals[0] / totals[1]).item() / LN2


def generate_text(
    model,
    prompt: bytes,
    length: int,
    rt: Runtime,
    *,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    compile: bool = False,
) -> str:
    """Sample `length` bytes after `prompt`, with its own seed (the training RNG stays untouched);
    `compile`: the decoding steps through torch.compile."""
    x = torch.tensor(list(prompt), dtype=torch.long, device=rt.device)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []), rt.autocast():
        torch.manual_seed(seed)
        out = model.generate(x, length, temperature=temperature, top_k=top_k, top_p=top_p, compile=compile)
    return bytes(out.tolist()).decode("utf-8", errors="replace")


def shard(model) -> None:
    """FSDP2: each attention and feed-forward layer, then the rest of the network, sharded over processes."""
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:
        raise ConfigError(f"--fsdp needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}") from None

    # the layers return views (a Linear on (B, N, D)); the model only adds them out of place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    sharded = [sublayer for block in model.net.layers.blocks for sublayer in (block.f, block.g)] + [model.net]
    for module in sharded:
        fully_shard(module)
        # samples during training decode through `step`, which must gather the parameters as `forward` does
        register_fsdp_forward_method(module, "step")


def set_grad_sync(trained, model, enabled: bool) -> None:
    """Gradients are reduced over processes only in the last micro-batch of a step."""
    if isinstance(trained, DistributedDataParallel):
        trained.require_backward_grad_sync = enabled
    elif hasattr(model.net, "set_requires_gradient_sync"):  # sharded by FSDP2
        model.net.set_requires_gradient_sync(enabled)


def train(cfg: Config, out_dir: Path, resume: checkpoint.Checkpoint | None = None) -> None:
    """Train `cfg` into `out_dir`, or continue the checkpoint `resume` (whose config `cfg` must keep)."""
    rt = start_runtime(cfg.device, cfg.precision)
    try:
        run(cfg, out_dir, resume, rt)
    finally:
        stop_runtime()


def run(cfg: Config, out_dir: Path, resume: checkpoint.Checkpoint | None, rt: Runtime) -> None:
    validate(cfg, rt.world_size)
    corpus = data.load_corpus(cfg.data, cfg.max_data_bytes)
    data.require_bytes(corpus, "train", cfg.seq_len)
    data.require_bytes(corpus, "val", cfg.seq_len)
    pieces = data.document_pieces(corpus, cfg.seq_len) if cfg.pack else None
    micro_batch = cfg.batch_size // cfg.grad_accum  # sequences per micro-step, all processes together
    val_starts = data.eval_starts(corpus.val, cfg.seq_len, cfg.eval_batches * micro_batch)
    val_starts = val_starts[: len(val_starts) // rt.world_size * rt.world_size]  # equal shares (FSDP)
    start_step = resume.step if resume else 0
    if finished(start_step, cfg.steps, out_dir, rt):
        return

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = build_model(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    if resume:
        model.load_state_dict(resume.model)
    trained = model  # what the training step calls: the model, or DDP around it
    if rt.world_size > 1 and cfg.fsdp:
        shard(model)  # moves one layer at a time to the device: the whole model never has to fit
    else:
        model.to(rt.device)
        if rt.world_size > 1:
            trained = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        elif cfg.fsdp:
            rt.print("note: --fsdp shards over processes; with one process it changes nothing")
    if cfg.compile:
        model.net.compile()

    optimizer = adamw(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    if resume:
        restore_training_state(model, optimizer, resume, cfg.seed, rt)
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout differs between processes
    elapsed = resume.state.get("elapsed_s", 0.0) if resume else 0.0
    tokens_seen = resume.state.get("tokens", 0) if resume else 0

    tokens_per_step = cfg.batch_size * cfg.seq_len
    metrics = None
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        start_clean(out_dir, rt)
        metrics = MetricsLog(out_dir, start_step, COLUMNS, SCALARS)
    precision = "bf16 autocast" if rt.bf16 else "fp32"
    rt.print(
        f"data: {corpus.name}",
        f"model: {num_params / 1e6:.2f}M parameters, dim {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads x "
        f"{cfg.dim_head}, block {cfg.block_size}, {cfg.attention} attention, context {cfg.seq_len}",
        f"training: {rt.world_size} process(es) on {rt.device.type} ({precision}{', FSDP' if cfg.fsdp else ''}), "
        f"{cfg.batch_size} x {cfg.seq_len} = {tokens_per_step:,} tokens/step{', documents packed' if cfg.pack else ''}"
        f", steps {start_step + 1}..{cfg.steps}"
        f" -> {out_dir}",
    )
    sample_prompt = bytes(corpus.val[:48].tolist())
    bar = progress_bar(cfg.steps, start_step, rt)
    val_bpb, last_saved = float("nan"), start_step
    clock = last_read = time.perf_counter()
    queued = []  # (step, lr, PendingLoss) of the steps whose loss is not read yet, oldest first
    for step in range(start_step + 1, cfg.steps + 1):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.pack:
            packed = data.train_pack(corpus.train, pieces, cfg.seq_len, cfg.batch_size, cfg.seed, step)
        else:
            batch = data.train_batch(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, step)
        step_loss = torch.zeros((), device=rt.device)
        for micro in range(cfg.grad_accum):
            if cfg.pack:  # this process's rows of the micro-batch, as the windows' rows are split below
                lo = (micro * rt.world_size + rt.rank) * micro_batch // rt.world_size
                x, cu_seqlens, longest = packed.rows(lo, lo + micro_batch // rt.world_size)
                packing = {"cu_seqlens": cu_seqlens, "max_seqlen": longest}  # lengths stay on the host
            else:
                x, packing = batch.chunk(cfg.grad_accum)[micro].chunk(rt.world_size)[rt.rank], {}
            x = x.to(rt.device, non_blocking=True).long()
            set_grad_sync(trained, model, micro == cfg.grad_accum - 1)
            with rt.autocast():
                loss = trained(x, **packing) / cfg.grad_accum
            loss.backward()
            step_loss += loss.detach()
        queued.append((step, lr, PendingLoss(rt.all_sum(step_loss))))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        sample = bool(cfg.sample_every) and step % cfg.sample_every == 0
        # The host reads a step's loss once the next step is queued (steps that evaluate, save or sample:
        # at once), so the device has work while the host logs and makes the next batch. A non-finite
        # loss therefore stops the run after at most one more update, and always before a checkpoint.
        due = len(queued) if evaluate or sample else len(queued) - 1
        if due <= 0:
            continue
        done_steps, queued = queued[:due], queued[due:]
        losses = []
        for done, _, pending in done_steps:
            losses.append(pending.value() / rt.world_size / LN2)  # the same on every process
            check_finite(losses[-1], done, out_dir, last_saved)
        now = time.perf_counter()
        tokens_per_s = tokens_per_step * due / (now - last_read)  # evaluations and samples excluded
        last_read = now
        for (done, done_lr, _), train_bpb in zip(done_steps, losses):
            tokens_seen += tokens_per_step
            bar.update()
            bar.set_postfix_str(f"loss {train_bpb:.3f} bpb, {tokens_per_s:,.0f} tok/s", refresh=False)
            row = {"step": done, "tokens": tokens_seen, "lr": done_lr, "train_bpb": train_bpb,
                   "tokens_per_s": tokens_per_s}  # fmt: skip
            if done == step and evaluate:
                val_bpb = evaluate_bpb(model, corpus.val, val_starts, cfg.seq_len, micro_batch // rt.world_size, rt)
                row["val_bpb"] = val_bpb
                rt.print(
                    f"step {step}: train {train_bpb:.3f} bpb, validation {val_bpb:.3f} bpb, "
                    f"{format_duration(elapsed + time.perf_counter() - clock)}"
                )
            row["elapsed_s"] = elapsed + time.perf_counter() - clock
            if metrics:
                metrics.log(row)
            if "val_bpb" in row:
                state = {"tokens": row["tokens"], "elapsed_s": row["elapsed_s"]}
                save_checkpoint(out_dir, LM, cfg, model, optimizer, rt, step, state)
                last_saved = step
                if rt.is_main:
                    plot_curves(out_dir, "train_bpb", "val_bpb", "bits per byte")
        if sample:
            text = generate_text(model, sample_prompt, cfg.sample_length, rt, seed=cfg.seed)
            rt.print(f"--- sample at step {step} ---", sample_prompt.decode("utf-8", "replace") + text, "---")
        if evaluate or sample:
            last_read = time.perf_counter()  # the next step's time starts here
    bar.close()
    if metrics:
        metrics.close()
    total = elapsed + time.perf_counter() - clock
    rt.print(
        f"done: step {cfg.steps}, validation {val_bpb:.3f} bits per byte, {format_duration(total)}; "
        f"checkpoints in {out_dir / checkpoint.SAVES}, metrics.csv and curves.png in {out_dir}"
    )
