"""Pieces of a training loop: optimizer, schedules, a guard against non-finite losses, the training state a
checkpoint saves and restores (weights, optimizer, RNG of every process), and the progress bar."""

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

from . import checkpoint
from .runtime import Runtime

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices and embeddings, none on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW over `groups` (parameters or parameter groups): the fused implementation when every parameter
    is on a GPU (one kernel per step instead of several per tensor group, so less host time in eager steps;
    see benchmarks/results/train_speed/), else the default."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup to `lr` over `warmup` steps, then cosine decay to lr/10 at `steps` (steps count from 1)."""
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - lr / 10)


def warmup_to_zero(step: int, lr: float, warmup: int, steps: int, shape: str = "linear") -> float:
    """Linear warmup to `lr` over `warmup` steps, then linear or cosine decay that reaches zero one step after
    the last (steps count from 1), so every step of the run moves the weights."""
    if step <= warmup:
        return lr * step / warmup
    progress = min((step - 1 - warmup) / max(1, steps - warmup), 1.0)  # 0 at the first step after the warmup
    return lr * (1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_rsqrt(step: int, lr: float, warmup: int) -> float:
    """Linear warmup to `lr` over `warmup` steps, then lr * sqrt(warmup / step) (steps count from 1)."""
    warmup = max(warmup, 1)
    return lr * min(step / warmup, math.sqrt(warmup / step))


class DivergedError(RuntimeError):
    """The training loss, a weight or the optimizer state became NaN or infinite. Raised before the next
    checkpoint is written (the language model reads a step's loss once the next step is queued, lra/ before
    the optimizer update, and every save checks the tensors it would write), so no checkpoint ever holds
    non-finite values: the one in --out is the last good state."""


def diverged(what: str, step: int, out_dir: Path, last_saved: int) -> DivergedError:
    """The error that stops a run at `step` because `what` is not finite, saying what is kept and what to change."""
    kept = f"{out_dir} keeps the checkpoint of step {last_saved}" if last_saved else f"nothing was saved in {out_dir}"
    return DivergedError(
        f"step {step}: {what} (not finite), so training stopped; {kept}. Lower --lr, set --grad-clip, or use "
        f"--precision fp32, and train again (--resume of the same configuration repeats the same steps)"
    )


def check_finite(loss: float, step: int, out_dir: Path, last_saved: int) -> None:
    """Stop a run whose loss is not finite."""
    if not math.isfinite(loss):
        raise diverged(f"the training loss is {loss}", step, out_dir, last_saved)


def first_nonfinite(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime) -> str | None:
    """The first weight or optimizer tensor of this process holding NaN or infinity, on every process (their
    verdicts are summed, so all stop together); None if all are finite. Sharded tensors are checked by shard."""
    named = [(f"weight {name}", p) for name, p in model.named_parameters()]
    names = {p: name for name, p in model.named_parameters()}
    named += [(f"optimizer {key} of {names.get(p, '?')}", t) for p, s in optimizer.state.items()
              for key, t in s.items() if torch.is_tensor(t)]  # fmt: skip
    local = [(what, t.to_local() if hasattr(t, "to_local") else t) for what, t in named]
    bad = [~torch.isfinite(t).all() for _, t in local if t.is_floating_point()]
    flags = torch.stack(bad) if bad else torch.zeros(0, dtype=torch.bool)
    if not int(rt.all_sum(flags.any().to(rt.device, torch.float32))):
        return None
    floating = [what for what, t in local if t.is_floating_point()]
    return next((what for what, flag in zip(floating, flags.tolist()) if flag), "a tensor of another process")


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


def rng_states(rt: Runtime) -> dict[str, torch.Tensor]:
    """The random state of every process (dropout), gathered on all of them, as "cpu.<rank>" / "cuda.<rank>"."""
    mine = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(rt.device)
    everyone = [mine]
    if rt.world_size > 1:
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, mine)
    return {f"{kind}.{rank}": state for rank, states in enumerate(everyone) for kind, state in states.items()}


def restore_rng(saved: dict[str, torch.Tensor], saved_world_size: int, seed: int, step: int, rt: Runtime) -> None:
    """This process's saved random state; with another number of processes, a fresh stream per process."""
    if saved_world_size != rt.world_size or f"cpu.{rt.rank}" not in saved:
        rt.print(
            f"note: {saved_world_size} process(es) saved this checkpoint, {rt.world_size} resume it: "
            "dropout random streams are re-seeded"
        )
        torch.manual_seed(seed + 1000003 * step + rt.rank)
        return
    torch.set_rng_state(saved[f"cpu.{rt.rank}"])
    if rt.device.type == "cuda" and f"cuda.{rt.rank}" in saved:
        torch.cuda.set_rng_state(saved[f"cuda.{rt.rank}"], rt.device)


def save_checkpoint(out_dir: Path, app: checkpoint.App, cfg, model, optimizer, rt: Runtime, step: int,
                    state: dict) -> None:  # fmt: skip
    """Gather full weights and optimizer state on process 0 (a collective under FSDP), which writes them;
    `state` holds the JSON-able progress (tokens, elapsed time, ...). Non-finite weights or optimizer state
    stop the run (DivergedError) instead of being saved."""
    if (what := first_nonfinite(model, optimizer, rt)) is not None:
        raise diverged(f"the {what} holds NaN or infinity", step, out_dir, checkpoint.latest_step(out_dir))
    weights = get_model_state_dict(model, options=FULL_STATE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    rng = rng_states(rt)
    if rt.is_main:
        state = {**state, "world_size": rt.world_size}
        checkpoint.save(out_dir, app, step=step, config=cfg, model=weights, optimizer=optimizer_state, rng=rng,
                        state=state)  # fmt: skip


def restore_training_state(model, optimizer, ckpt: checkpoint.Checkpoint, seed: int, rt: Runtime) -> None:
    """The optimizer and random state of `ckpt` (its weights are loaded into `model` before it is sharded)."""
    try:
        set_optimizer_state_dict(model, optimizer, ckpt.optimizer, options=StateDictOptions(full_state_dict=True))
        restore_rng(ckpt.rng, ckpt.state.get("world_size", 0), seed, ckpt.step, rt)
    except (KeyError, ValueError, RuntimeError) as e:
        raise checkpoint.CheckpointError(
            f"{ckpt.directory / checkpoint.STATE_TENSORS}: the training state does not fit this optimizer ({e})"
        ) from None


def start_clean(out_dir: Path, rt: Runtime) -> None:
    """Remove what interrupted saves left in `out_dir` (in the process that writes, before it writes)."""
    if removed := checkpoint.remove_stale(out_dir):
        rt.print(f"note: removed {len(removed)} interrupted save(s) from {out_dir / checkpoint.SAVES}")


def finished(start_step: int, steps: int, out_dir: Path, rt: Runtime) -> bool:
    """Whether a resumed run already stands at --steps (it says so, and trains no further)."""
    if start_step < steps:
        return False
    rt.print(f"{out_dir} is at step {start_step} already; raise --steps (now {steps}) to continue")
    return True


def progress_bar(steps: int, start_step: int, rt: Runtime) -> tqdm:
    """Steps done out of `steps`; redrawn every second on a terminal, every 30 s into a log file."""
    return tqdm(total=steps, initial=start_step, unit="step", disable=not rt.is_main, dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)  # fmt: skip


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"
