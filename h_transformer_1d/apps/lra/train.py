"""The ListOps recipe: the data as tensors, the training loop and evaluation (its configuration: config.py).

A run writes to --out: checkpoints/step-N/ (weights, configuration, optimizer, RNG and progress, at every
validation and at the end; core/checkpoint.py), metrics.csv, curves.png and results.json (the test accuracy of
the final model). A `resume` checkpoint continues the run in --out exactly where it stands.
"""

import dataclasses
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core import checkpoint
from ..core.config import MAX_DATA_BYTES, ConfigError
from ..core.files import atomic_write, open_regular
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
)
from ..data import DataError
from . import listops
from .config import LISTOPS, ListOpsConfig, build_classifier, validate

TASK = LISTOPS.task
# Batches are padded to a multiple of this many tokens: few distinct shapes, so per-shape work (cuDNN
# attention plans, kernel layouts) is done a dozen times per run rather than at almost every step.
LENGTH_MULTIPLE = 128
COLUMNS = ("step", "examples", "lr", "train_loss", "train_acc", "val_acc", "examples_per_s", "elapsed_s")
SCALARS = ("lr", "train_loss", "train_acc", "val_acc", "examples_per_s")
RESULTS = "results.json"


def learning_rate(cfg: ListOpsConfig, step: int) -> float:
    """Linear warmup to --lr at --warmup-steps, then lr * sqrt(warmup / step) (steps count from 1)."""
    return warmup_rsqrt(step, cfg.lr, cfg.warmup_steps)


# --- data -----------------------------------------------------------------------------------------


@dataclass
class Split:
    """The examples of one split as tensors: token ids end to end, where each starts, the labels."""

    tokens: torch.Tensor  # (T,) uint8, every example's ids, concatenated
    starts: torch.Tensor  # (n + 1,) int64, example i is tokens[starts[i]:starts[i + 1]]
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> torch.Tensor:
        return self.starts[1:] - self.starts[:-1]

    def to(self, device) -> "Split":
        return Split(self.tokens.to(device), self.starts.to(device), self.labels.to(device))

    def batch(
        self, indices: torch.Tensor, seq_len: int, cls: bool, multiple: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids x (B, L) on the split's device and their mask (B, L): each example truncated to
        seq_len (<cls> included, first, if asked) and padded; L is the longest rounded up to a
        multiple of `multiple`, at most seq_len. A few gathers, no loop over the examples."""
        indices = indices.to(self.starts.device)
        begin = self.starts[indices]
        lengths = torch.clamp(self.starts[indices + 1] - begin, max=seq_len - cls)
        longest = int(lengths.max()) + cls
        width = min(-(-longest // multiple) * multiple, seq_len) - cls
        pos = torch.arange(width, device=begin.device)
        mask = pos < lengths[:, None]
        tokens = self.tokens if len(self.tokens) else self.tokens.new_zeros(1)  # something to gather from
        ids = tokens[(begin[:, None] + pos).clamp(max=len(tokens) - 1)].long()
        x = torch.where(mask, ids, listops.PAD)
        if cls:
            x = torch.cat((x.new_full((len(x), 1), listops.CLS), x), 1)
            mask = torch.cat((mask.new_ones((len(mask), 1)), mask), 1)
        return x, mask


def load_split(data_dir: Path, split: str, max_bytes: int = MAX_DATA_BYTES) -> Split:
    """The examples of a split's TSV file, a regular file of at most `max_bytes` bytes."""
    path = data_dir / listops.SPLITS[split]
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(
            f"--data {data_dir}: no {path.name}. Create the ListOps files with: "
            f"h-transformer-1d lra listops prepare --out {data_dir}"
        ) from None
    except OSError as e:
        raise DataError(f"--data {data_dir}: cannot read {path.name} ({e})") from None
    if size > max_bytes:
        raise DataError(
            f"--data {data_dir}: {path.name} holds {size:,} bytes, more than --max-data-bytes {max_bytes:,}"
        )
    ids, starts, labels = bytearray(), [0], []
    for text, label in listops.read_split(path):
        ids += bytes(listops.encode(text))
        starts.append(len(ids))
        labels.append(label)
    if not labels:
        raise DataError(f"{path} holds no examples")
    tokens = torch.frombuffer(ids, dtype=torch.uint8) if ids else torch.empty(0, dtype=torch.uint8)
    return Split(tokens, torch.tensor(starts), torch.tensor(labels))


@lru_cache(maxsize=1)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def train_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The examples of a step: epochs of a seeded permutation, the last partial batch of each dropped."""
    epoch, i = divmod(step - 1, n // batch_size)
    return epoch_order(n, seed, epoch)[i * batch_size : (i + 1) * batch_size]


@torch.no_grad()
def accuracy(model, split: Split, cfg: ListOpsConfig, rt: Runtime, batch_size: int, progress: bool = False) -> float:
    """The fraction of a split classified correctly; batches of similar lengths, so little padding."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=split.labels.device)
    order = split.lengths.argsort(stable=True)
    for indices in tqdm(order.split(batch_size), desc="evaluating", disable=not progress, leave=False):
        x, mask = split.batch(indices, cfg.seq_len, cfg.pool == "cls", LENGTH_MULTIPLE)
        with rt.autocast():
            logits = model(x.to(rt.device), mask.to(rt.device))
        correct += (logits.argmax(-1).to(correct.device) == split.labels[indices]).sum()
    model.train(was_training)
    return correct.item() / len(split)


# --- training -------------------------------------------------------------------------------------


def train(cfg: ListOpsConfig, out_dir: Path, resume: checkpoint.Checkpoint | None = None) -> dict | None:
    """Train the recipe into `out_dir`, or continue the checkpoint `resume` (whose model `cfg` must keep);
    returns what results.json holds (None when a resumed run already stands at --steps)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("lra listops train runs in one process; start it without torchrun")
    validate(cfg)
    rt = start_runtime(cfg.device, cfg.precision)
    start_step = resume.step if resume else 0
    if finished(start_step, cfg.steps, out_dir, rt):
        return None
    data_dir = Path(cfg.data)
    rt.print(f"reading {data_dir} ...")
    train_set, val_set, test_set = (load_split(data_dir, split, cfg.max_data_bytes).to(rt.device)
                                    for split in listops.SPLITS)  # fmt: skip
    if len(train_set) < cfg.batch_size:
        raise DataError(f"--batch-size {cfg.batch_size} is more than the {len(train_set)} training examples")
    cls = cfg.pool == "cls"
    truncated = sum(int((s.lengths > cfg.seq_len - cls).sum()) for s in (train_set, val_set, test_set))

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg)
    if resume:
        model.load_state_dict(resume.model)
    model.to(rt.device)
    num_params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    best, val_acc, elapsed = (-1.0, 0), float("nan"), 0.0  # best: validation accuracy, step
    if resume:
        restore_training_state(model, optimizer, resume, cfg.seed, rt)
        best = (resume.state.get("best_val_acc", -1.0), resume.state.get("best_val_step", 0))
        val_acc, elapsed = resume.state.get("val_acc", float("nan")), resume.state.get("elapsed_s", 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    start_clean(out_dir, rt)
    metrics = MetricsLog(out_dir, start_step, columns=COLUMNS, scalars=SCALARS)
    rt.print(
        f"data: {data_dir}: {len(train_set):,} train, {len(val_set):,} validation, {len(test_set):,} test examples"
        + (f" ({truncated:,} truncated to --seq-len {cfg.seq_len})" if truncated else ""),
        f"model: {num_params / 1e6:.2f}M parameters, dim {cfg.dim}, depth {cfg.depth}, {cfg.heads} heads x "
        f"{cfg.dim_head}, feed-forward {cfg.dim * cfg.ff_mult}, block {cfg.block_size}, {cfg.attention} attention, "
        f"{cfg.pool} pooling, max length {cfg.seq_len}",
        f"training: {rt.device.type} ({'bf16 autocast' if rt.bf16 else 'fp32'}), batch {cfg.batch_size}, "
        f"steps {start_step + 1}..{cfg.steps} -> {out_dir}" + (" (resumed)" if start_step else ""),
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
        indices = train_indices(len(train_set), cfg.batch_size, cfg.seed, step).to(rt.device)
        x, mask = train_set.batch(indices, cfg.seq_len, cls, LENGTH_MULTIPLE)
        y = train_set.labels[indices]
        with rt.autocast():
            logits = model(x.to(rt.device), mask.to(rt.device))  # (B, 10)
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
            best = max(best, (val_acc, step))
            rt.print(
                f"step {step}: train loss {train_loss:.3f}, validation accuracy {val_acc:.4f}, "
                f"{format_duration(time.perf_counter() - start)}"
            )
        row["elapsed_s"] = time.perf_counter() - start
        metrics.log(row)
        if "val_acc" in row:
            progress = {"val_acc": val_acc, "best_val_acc": best[0], "best_val_step": best[1],
                        "elapsed_s": row["elapsed_s"]}  # fmt: skip
            save_checkpoint(out_dir, LISTOPS, cfg, model, optimizer, rt, step, progress)
            last_saved = step
            plot_curves(out_dir, train_key="train_acc", val_key="val_acc", label="accuracy")
    bar.close()
    metrics.close()
    train_time = time.perf_counter() - start
    test_acc = accuracy(model, test_set, cfg, rt, cfg.batch_size)
    results = {
        "task": TASK,
        "attention": cfg.attention,
        "steps": cfg.steps,
        "test_accuracy": test_acc,
        "val_accuracy": val_acc,
        "best_val_accuracy": best[0],
        "best_val_step": best[1],
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
        f"done: test accuracy {test_acc:.4f} (validation {val_acc:.4f}, best {best[0]:.4f} at step {best[1]}), "
        f"{format_duration(train_time)}; checkpoints, metrics.csv, curves.png and {RESULTS} in {out_dir}"
    )
    return results
