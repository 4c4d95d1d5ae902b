"""The training loop, and the runtime it shares with evaluate, generate and bench.

Several processes: `torchrun --nproc_per_node K -m h_transformer_1d train ...`. Each process draws the
same global batch (it depends on seed and step only) and takes its own rows of each micro-batch, so
the gradient of a step is the one of a single process with the same --batch-size. Process 0 alone
prints, logs and writes checkpoints.
"""

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint, data
from .config import Config, ConfigError, build_model, validate
from .metrics import MetricsLog
from .plots import plot_curves

LN2 = math.log(2)


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite. Raised before the next checkpoint is written (the
    language model reads a step's loss once the next step is queued, lra/ before the optimizer update),
    so no checkpoint ever holds non-finite weights: the one in --out is the last good state."""


def check_finite(loss: float, step: int, out_dir: Path, last_saved: int) -> None:
    """Stop a run whose loss is not finite, saying what is kept and what to change."""
    if math.isfinite(loss):
        return
    kept = f"{out_dir} keeps the checkpoint of step {last_saved}" if last_saved else f"nothing was saved in {out_dir}"
    raise DivergedError(
        f"step {step}: the training loss is {loss} (not finite), so training stopped; {kept}. Lower --lr, set "
        f"--grad-clip, or use --precision fp32, and train again (--resume of the same configuration repeats the "
        f"same steps)"
    )


class PendingLoss:
    """A step's loss on its way to the host. On a GPU it is copied into pinned memory behind a CUDA
    event, so reading it waits only for the work queued before it; `Tensor.item()` would wait for
    everything queued since (the next step too) and leave the device idle while the host catches up."""

    def __init__(self, loss: torch.Tensor):
        self.host, self.ready = loss, None
        if loss.is_cuda:
            self.host = torch.empty((), dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def value(self) -> float:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.item()


@dataclass
class Runtime:
    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def print(self, *lines: str) -> None:
        if self.is_main:
            for line in lines:
                tqdm.write(line)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu" and not getattr(torch, device.type).is_available():
        raise ConfigError(f"--device {name}: {device.type} is not available on this machine")
    return device


def start_runtime(device_name: str, precision: str) -> Runtime:
    """The device, precision and (under torchrun) process group of this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        if world_size > 1 and device.index != local_rank:
            raise ConfigError(f"--device {device_name}: under torchrun each process uses cuda:LOCAL_RANK; pass cuda")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return Runtime(device, bf16, rank, world_size)


def stop_runtime() -> None:
    """Leave the process group (called from `finally`). On the normal path every process first waits
    for the others: gloo torn down by one process while another still writes the last checkpoint and
    plot once aborted the early one at exit (SIGABRT, a CI run). Not while an exception propagates, when
    the other processes may never arrive (torchrun stops them)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warmup to --lr, then cosine decay to lr/10 at --max-steps (steps count from 1)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr / 10 + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.lr / 10)


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
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ConfigError(f"--fsdp needs FSDP2 (torch >= 2.6), this is torch {torch.__version__}") from None

    # the layers return views (a Linear on (B, N, D)); the model only adds them out of place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.net.layers.blocks:
        fully_shard(block.f)
        fully_shard(block.g)
    fully_shard(model.net)


def set_grad_sync(trained, model, enabled: bool) -> None:
    """Gradients are reduced over processes only in the last micro-batch of a step."""
    if isinstance(trained, DistributedDataParallel):
        trained.require_backward_grad_sync = enabled
    elif hasattr(model.net, "set_requires_gradient_sync"):  # sharded by FSDP2
        model.net.set_requires_gradient_sync(enabled)


def rng_states(rt: Runtime) -> dict[str, torch.Tensor]:
    """The random state of every process (dropout), gathered on all of them."""
    mine = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(rt.device)
    everyone = [mine]
    if rt.world_size > 1:
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, mine)
    return {f"{kind}.{rank}": state for rank, states in enumerate(everyone) for kind, state in states.items()}


def restore_rng(saved: dict[str, torch.Tensor], saved_world_size: int, cfg: Config, step: int, rt: Runtime) -> None:
    if saved_world_size != rt.world_size or f"cpu.{rt.rank}" not in saved:
        rt.print(
            f"note: {saved_world_size} process(es) saved this checkpoint, {rt.world_size} resume it: "
            "dropout random streams are re-seeded"
        )
        torch.manual_seed(cfg.seed + 1000003 * step + rt.rank)
        return
    torch.set_rng_state(saved[f"cpu.{rt.rank}"])
    if rt.device.type == "cuda" and f"cuda.{rt.rank}" in saved:
        torch.cuda.set_rng_state(saved[f"cuda.{rt.rank}"], rt.device)


def save_checkpoint(out_dir: Path, cfg: Config, model, optimizer, rt: Runtime, step: int, state: dict) -> None:
    """Gather full weights and optimizer state on process 0 (a collective under FSDP), which writes them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = rng_states(rt)
    if rt.is_main:
        checkpoint.save(out_dir, step=step, config=cfg, model=weights, optimizer=optimizer_state, rng=rng, state=state)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def train(cfg: Config, out_dir: Path, resume: checkpoint.Checkpoint | None = None) -> None:
    """Train `cfg` into `out_dir`, or continue the checkpoint `resume` (whose config `cfg` must keep)."""
    rt = start_runtime(cfg.device, cfg.precision)
    try:
        run(cfg, out_dir, resume, rt)
    finally:
        stop_runtime()


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW over `groups` (parameters or parameter groups): the fused implementation when every
    parameter is on a GPU (one kernel per step instead of several per tensor group: less host time in
    eager steps; H100, base model, context 4,096, dense eager 89.7 -> 86.5 ms per step), else the default."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def run(cfg: Config, out_dir: Path, resume: checkpoint.Checkpoint | None, rt: Runtime) -> None:
    validate(cfg, rt.world_size)
    corpus = data.load_corpus(cfg.data)
    data.require_bytes(corpus, "train", cfg.seq_len)
    data.require_bytes(corpus, "val", cfg.seq_len)
    micro_batch = cfg.batch_size // cfg.grad_accum  # sequences per micro-step, all processes together
    val_starts = data.eval_starts(corpus.val, cfg.seq_len, cfg.eval_batches * micro_batch)
    val_starts = val_starts[: len(val_starts) // rt.world_size * rt.world_size]  # equal shares (FSDP)
    start_step = resume.step if resume else 0
    if start_step >= cfg.max_steps:
        rt.print(f"{out_dir} is at step {start_step} already; raise --max-steps (now {cfg.max_steps}) to continue")
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
        set_optimizer_state_dict(model, optimizer, resume.optimizer, options=StateDictOptions(full_state_dict=True))
        restore_rng(resume.rng, resume.state.get("world_size", 0), cfg, start_step, rt)
    else:
        torch.manual_seed(cfg.seed + rt.rank)  # dropout differs between processes
    elapsed = resume.state.get("elapsed_s", 0.0) if resume else 0.0
    tokens_seen = resume.state.get("tokens", 0) if resume else 0

    tokens_per_step = cfg.batch_size * cfg.seq_len
    metrics = None
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out_dir, start_step)
    precision = "bf16 autocast" if rt.bf16 else "fp32"
    rt.print(
        f"data: {corpus.name}",
        f"model: {num_params / 1e6:.2f}M parameters, dim {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads x "
        f"{cfg.dim_head}, block {cfg.block_size}, {cfg.attention} attention, context {cfg.seq_len}",
        f"training: {rt.world_size} process(es) on {rt.device.type} ({precision}{', FSDP' if cfg.fsdp else ''}), "
        f"{cfg.batch_size} x {cfg.seq_len} = {tokens_per_step:,} tokens/step, steps {start_step + 1}..{cfg.max_steps}"
        f" -> {out_dir}",
    )
    sample_prompt = bytes(corpus.val[:48].tolist())
    bar = tqdm(
        total=cfg.max_steps,
        initial=start_step,
        unit="step",
        disable=not rt.is_main,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    val_bpb, last_saved = float("nan"), start_step
    clock = last_read = time.perf_counter()
    queued = []  # (step, lr, PendingLoss) of the steps whose loss is not read yet, oldest first
    for step in range(start_step + 1, cfg.max_steps + 1):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.train_batch(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, step)
        step_loss = torch.zeros((), device=rt.device)
        for micro, rows in enumerate(batch.chunk(cfg.grad_accum)):
            x = rows.chunk(rt.world_size)[rt.rank].to(rt.device, non_blocking=True).long()
            set_grad_sync(trained, model, micro == cfg.grad_accum - 1)
            with rt.autocast():
                loss = trained(x) / cfg.grad_accum
            loss.backward()
            step_loss += loss.detach()
        queued.append((step, lr, PendingLoss(rt.all_sum(step_loss))))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        evaluate = step % cfg.eval_every == 0 or step == cfg.max_steps
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
                state = {"tokens": row["tokens"], "elapsed_s": row["elapsed_s"], "world_size": rt.world_size}
                save_checkpoint(out_dir, cfg, model, optimizer, rt, step, state)
                last_saved = step
                if rt.is_main:
                    plot_curves(out_dir)
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
        f"done: step {cfg.max_steps}, validation {val_bpb:.3f} bits per byte, {format_duration(total)}; "
        f"checkpoint, metrics.csv and curves.png in {out_dir}"
    )
