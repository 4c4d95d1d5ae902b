"""The ListOps recipe: the training loop and evaluation (its configuration: config.py; the data: data.py).

A run writes to --out: checkpoints/step-N/ (weights, configuration, optimizer, RNG and progress, at every
validation and at the end; core/checkpoint.py), best/checkpoints/step-N/ (the best validation's), metrics.csv,
curves.png and results.json (the test accuracy of the final model and of the best validation's). A `resume`
checkpoint continues the run in --out exactly where it stands.
"""

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core import checkpoint
from ..core.config import ConfigError, flag, model_fields
from ..core.files import atomic_write
from ..core.metrics import MetricsLog
from ..core.plots import plot_curves
from ..core.runtime import Runtime, start_runtime
from ..core.training import (
    adamw,
    check_finite,
    decay_groups,
    finished,
    format_duration,
    progress_bar,
    restore_training_state,
    save_checkpoint,
    start_clean,
    warmup_rsqrt,
    warmup_to_zero,
)
from ..data import DataError
from . import listops
from .config import (
    LISTOPS,
    MASK,
    PRETRAIN,
    ListOpsConfig,
    PretrainConfig,
    Recipe,
    build_classifier,
    build_pretrain_model,
    validate,
)
from .data import Batches, Split, load_split, seed_of
from .model import SequenceClassifier

__all__ = ["Batches", "Split", "accuracy", "learning_rate", "load_split", "train"]

# Batches are padded to a multiple of this many tokens: few distinct shapes, so per-shape work (cuDNN
# attention plans, kernel layouts) is done a dozen times per run rather than at almost every step.
LENGTH_MULTIPLE = 128
COLUMNS = ("step", "examples", "lr", "train_loss", "train_acc", "val_acc", "examples_per_s", "elapsed_s")
SCALARS = ("lr", "train_loss", "train_acc", "val_acc", "examples_per_s")
RESULTS = "results.json"


BEST = "best"  # <out>/best/: the save of the step with the best validation accuracy so far


def learning_rate(cfg: ListOpsConfig, step: int) -> float:
    """Linear warmup to --lr at --warmup-steps, then (--schedule) lr * sqrt(warmup / step), or linear or cosine
    decay to zero at the end of the run (steps count from 1)."""
    if cfg.schedule == "rsqrt":
        return warmup_rsqrt(step, cfg.lr, cfg.warmup_steps)
    return warmup_to_zero(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.schedule)


def budget(cfg: ListOpsConfig, examples: int) -> ListOpsConfig:
    """The configuration with --steps from --epochs, when the budget is given in epochs."""
    if cfg.epochs <= 0:
        return cfg
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * examples / cfg.batch_size)))


def train_indices(batches: Batches, step: int) -> torch.Tensor:
    """The training examples of a step."""
    return batches.indices(step)


def uses_cls(cfg: Recipe) -> bool:
    """Whether the inputs start with <cls>: always when pretraining, so a classifier with --pool cls finds it
    trained."""
    return isinstance(cfg, PretrainConfig) or cfg.pool == "cls"


def mask_tokens(x: torch.Tensor, mask: torch.Tensor, rate: float, generator: torch.Generator):
    """The inputs of masked-token prediction and where they are masked (B, N): in each sequence round(rate x
    its tokens), at least one, drawn among its real tokens after the <cls> at position 0, become <mask>."""
    eligible = mask.clone()
    eligible[:, 0] = False
    keys = torch.rand(x.shape, generator=generator, device=x.device).masked_fill(~eligible, 2.0)
    rank = keys.argsort(dim=1).argsort(dim=1)  # the eligible positions first, in a random order
    count = (eligible.sum(1) * rate).round().clamp(min=1)
    masked = (rank < count[:, None]) & eligible
    return x.masked_fill(masked, MASK), masked


def predict(model, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, cfg: Recipe, seed: int):
    """The logits and their targets: one label per sequence, or (pretraining) one token per masked position,
    the masks drawn from `seed`."""
    if not isinstance(cfg, PretrainConfig):
        return model(x, mask), labels
    inputs, masked = mask_tokens(x, mask, cfg.mask_rate, torch.Generator(x.device).manual_seed(seed))
    return model(inputs, mask)[masked], x[masked]


@torch.no_grad()
def accuracy(model, split: Split, cfg: Recipe, rt: Runtime, batch_size: int, progress: bool = False) -> float:
    """The fraction of a split classified correctly (pretraining: of its masked tokens predicted, the same
    masks at every validation); batches of similar lengths, so little padding."""
    was_training = model.training
    model.eval()
    correct = total = torch.zeros((), dtype=torch.long, device=rt.device)
    order = split.lengths.argsort(stable=True)
    batches = tqdm(order.split(batch_size), desc="evaluating", disable=not progress, leave=False)
    for i, indices in enumerate(batches):
        x, mask = split.batch(indices, cfg.seq_len, uses_cls(cfg), LENGTH_MULTIPLE)
        with rt.autocast():
            logits, y = predict(model, x.to(rt.device), mask.to(rt.device), split.labels[indices].to(rt.device),
                                cfg, seed_of("validation", 0, i))  # fmt: skip
        correct = correct + (logits.argmax(-1) == y).sum()
        total = total + len(y)
    model.train(was_training)
    return correct.item() / max(total.item(), 1)


def load_body(model: SequenceClassifier, directory: Path, cfg: ListOpsConfig) -> None:
    """The body of the last save of the pretraining run in `directory` into `model` (--init-from)."""
    ckpt = checkpoint.load(directory, PRETRAIN)
    differ = [f"{name}={getattr(ckpt.config, name)!r} (asked: {flag(name)} {getattr(cfg, name)!r})"
              for name in model_fields(Recipe) if getattr(ckpt.config, name) != getattr(cfg, name)]  # fmt: skip
    if differ:
        raise ConfigError(f"--init-from {directory} holds another body: {'; '.join(differ)}")
    body = {name: t for name, t in ckpt.model.items() if name.startswith("body.") and ".to_logits." not in name}
    body["body.token_emb.weight"] = body["body.token_emb.weight"][: len(listops.VOCAB)]  # without <mask>
    missing, unexpected = model.load_state_dict(body, strict=False)
    if unexpected or any(name.startswith("body.") for name in missing):
        raise ConfigError(f"--init-from {directory}: the weights do not fit the body ({missing + unexpected})")


# --- training -------------------------------------------------------------------------------------


def train(cfg: ListOpsConfig, out_dir: Path, resume: checkpoint.Checkpoint | None = None) -> dict | None:
    """Train the recipe into `out_dir`, or continue the checkpoint `resume` (whose model `cfg` must keep);
    returns what results.json holds (None when a resumed run already stands at --steps)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("lra listops train runs in one process; start it without torchrun")
    validate(cfg)
    rt = start_runtime(cfg.device, cfg.precision)
    data_dir = Path(cfg.data)
    rt.print(f"reading {data_dir} ...")
    train_set, val_set, test_set = (load_split(data_dir, split, cfg.max_data_bytes)
                                    for split in listops.SPLITS)  # fmt: skip
    if len(train_set) < cfg.batch_size:
        raise DataError(f"--batch-size {cfg.batch_size} is more than the {len(train_set)} training examples")
    cfg = budget(cfg, len(train_set))
    start_step = resume.step if resume else 0
    if finished(start_step, cfg.steps, out_dir, rt):
        return None
    batches = Batches(train_set.lengths, cfg.batch_size, cfg.seed, cfg.bucket)
    train_set, val_set, test_set = (s.to(rt.device) for s in (train_set, val_set, test_set))
    pretraining = isinstance(cfg, PretrainConfig)
    app = PRETRAIN if pretraining else LISTOPS
    cls = uses_cls(cfg)
    truncated = sum(int((s.lengths > cfg.seq_len - cls).sum()) for s in (train_set, val_set, test_set))

    torch.manual_seed(cfg.seed)
    model = build_pretrain_model(cfg) if pretraining else build_classifier(cfg)
    if resume:
        model.load_state_dict(resume.model)
    elif not pretraining and cfg.init_from:
        load_body(model, Path(cfg.init_from), cfg)
    model.to(rt.device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    best, val_acc, elapsed = (-1.0, 0), float("nan"), 0.0  # best: validation accuracy, step
    if resume:
        restore_training_state(model, optimizer, resume, cfg.seed, rt)
        best = (resume.state.get("best_val_acc", -1.0), resume.state.get("best_val_step", 0))
        val_acc, elapsed = resume.state.get("val_acc", float("nan")), resume.state.get("elapsed_s", 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    for directory in (out_dir, out_dir / BEST):
        start_clean(directory, rt)
    for step, save in checkpoint.saves(out_dir / BEST):
        if step > start_step:  # a best save of steps this run goes back over (resumed from an earlier save)
            checkpoint.discard(save)
    metrics = MetricsLog(out_dir, start_step, columns=COLUMNS, scalars=SCALARS)
    rt.print(
        f"data: {data_dir}: {len(train_set):,} train, {len(val_set):,} validation, {len(test_set):,} test examples"
        + (f" ({truncated:,} truncated to --seq-len {cfg.seq_len})" if truncated else ""),
        f"model: {num_params / 1e6:.2f}M parameters, dim {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads x "
        f"{cfg.dim_head}, feed-forward {cfg.dim * cfg.ff_mult}, block {cfg.block_size}, {cfg.attention} attention, "
        + ("masked-token prediction" if pretraining else f"{cfg.pool} pooling")
        + f", max length {cfg.seq_len}",
        f"training: {rt.device.type} ({'bf16 autocast' if rt.bf16 else 'fp32'}), batch {cfg.batch_size}, "
        f"steps {start_step + 1}..{cfg.steps} ({cfg.steps * cfg.batch_size / len(train_set):.1f} epochs), "
        f"{cfg.schedule} schedule"
        + (", operands shuffled" if cfg.shuffle_operands else "")
        + f" -> {out_dir}"
        + (" (resumed)" if start_step else ""),
    )
    bar = progress_bar(cfg.steps, start_step, rt)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    start, last_saved = time.perf_counter() - elapsed, start_step
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = train_indices(batches, step).to(rt.device)
        shuffle = None
        if cfg.shuffle_operands:  # a generator of its own per step: the same shuffles after --resume
            shuffle = torch.Generator(rt.device).manual_seed(seed_of("operands", cfg.seed, step))
        x, mask = train_set.batch(indices, cfg.seq_len, cls, LENGTH_MULTIPLE, shuffle)
        with rt.autocast():  # logits (B, 10) and labels, or (masked tokens, 18) and tokens
            logits, y = predict(model, x.to(rt.device), mask.to(rt.device), train_set.labels[indices], cfg,
                                seed_of("mask", cfg.seed, step))  # fmt: skip
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        train_loss, train_acc = loss.item(), (logits.argmax(-1) == y).float().mean().item()
        check_finite(train_loss, step, out_dir, last_saved)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples_per_s = cfg.batch_size / (time.perf_counter() - t0)
        bar.update()
        bar.set_postfix_str(f"loss {train_loss:.3f}, acc {train_acc:.3f}, {examples_per_s:,.0f} ex/s", refresh=False)

        row = {"step": step, "examples": step * cfg.batch_size, "lr": lr, "train_loss": train_loss}
        row.update(train_acc=train_acc, examples_per_s=examples_per_s)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_acc = row["val_acc"] = accuracy(model, val_set, cfg, rt, cfg.batch_size)
            improved = val_acc > best[0]  # on a tie the earlier step stays the best
            best = (val_acc, step) if improved else best
            rt.print(
                f"step {step}: train loss {train_loss:.3f}, validation accuracy {val_acc:.4f}"
                + (" (best)" if improved else "")
                + f", {format_duration(time.perf_counter() - start)}"
            )
        row["elapsed_s"] = time.perf_counter() - start
        metrics.log(row)
        if "val_acc" in row:
            progress = {"val_acc": val_acc, "best_val_acc": best[0], "best_val_step": best[1],
                        "elapsed_s": row["elapsed_s"]}  # fmt: skip
            if (
                improved and not pretraining
            ):  # before the run's own save, so a resumed run never stands past its best save
                save_checkpoint(out_dir / BEST, app, cfg, model, optimizer, rt, step, progress)
            save_checkpoint(out_dir, app, cfg, model, optimizer, rt, step, progress)
            last_saved = step
            plot_curves(out_dir, train_key="train_acc", val_key="val_acc", label="accuracy")
    bar.close()
    metrics.close()
    train_time = time.perf_counter() - start
    test_acc = accuracy(model, test_set, cfg, rt, cfg.batch_size)  # pretraining: of masked tokens
    best_test_acc, best_save = None, None
    if checkpoint.exists(out_dir / BEST):
        saved = checkpoint.load(out_dir / BEST, LISTOPS)
        best_save = str(saved.directory.relative_to(out_dir))
        best_test_acc = accuracy(LISTOPS.model_of(saved, rt.device), test_set, cfg, rt, cfg.batch_size)
    results = {
        "task": app.task,
        "attention": cfg.attention,
        "steps": cfg.steps,
        "epochs": round(cfg.steps * cfg.batch_size / len(train_set), 3),
        "test_accuracy": test_acc,
        "val_accuracy": val_acc,
        "best_val_accuracy": best[0],
        "best_val_step": best[1],
        "best_test_accuracy": best_test_acc,
        "best_checkpoint": best_save,
        "parameters": num_params,
        "train_time_s": round(train_time, 1),
        "train_examples_per_s": round((cfg.steps - start_step) * cfg.batch_size / (train_time - elapsed), 1)
        if train_time > elapsed
        else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
        if rt.device.type == "cuda"
        else None,
        "device": rt.device_name,
        "precision": "bf16" if rt.bf16 else "fp32",
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
    }
    atomic_write(out_dir / RESULTS, checkpoint.json_bytes(results))
    rt.print(
        f"done: test accuracy {test_acc:.4f} (validation {val_acc:.4f}), best validation {best[0]:.4f} at step "
        f"{best[1]}"
        + (f" (test accuracy {best_test_acc:.4f}, {best_save})" if best_save else "")
        + f", {format_duration(train_time)}; checkpoints, {'' if pretraining else 'best/, '}metrics.csv, curves.png and {RESULTS} in {out_dir}"
    )
    return results
