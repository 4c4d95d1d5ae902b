"""The ListOps recipe: its configuration, the data as tensors, the training loop, evaluation, checkpoints.

The defaults are LRA's ListOps setting: 4 layers, width 512, 8 heads, feed-forward 1024, batch 32,
5,000 steps, sequences of up to 2,000 tokens, Adam (0.9, 0.98, eps 1e-9) with decoupled weight
decay 0.1, a linear warmup over 1,000 steps then decay as 1/sqrt(step) (LRA's
"constant * linear_warmup * rsqrt_decay"), with two exceptions found best in our study
(docs/lra_listops.md): a peak learning rate of 1.5e-4 instead of LRA's 0.05/sqrt(1000) = 1.58e-3,
and the gradient norm clipped to 1 (LRA: no clipping). `--lr 0.0015811 --grad-clip 0` restores LRA's.

A run writes to --out: model.safetensors, config.json and train_state.* (optimizer, RNG and progress,
at every validation and at the end), metrics.csv, curves.png and results.json (the test accuracy of
the final model). `resume=True` continues the run in --out exactly where its last checkpoint stands.
"""

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from ...model import HTransformer1D
from .. import checkpoint
from ..checkpoint import CheckpointError
from ..config import ConfigError, _opt
from ..data import DataError
from ..metrics import MetricsLog
from ..plots import plot_curves
from ..train import Runtime, adamw, check_finite, decay_groups, format_duration, start_runtime
from . import listops
from .model import POOLS, SequenceClassifier

TASK = "listops"
# Batches are padded to a multiple of this many tokens: few distinct shapes, so per-shape work (cuDNN
# attention plans, kernel layouts) is done a dozen times per run rather than at almost every step.
LENGTH_MULTIPLE = 128
COLUMNS = ("step", "examples", "lr", "train_loss", "train_acc", "val_acc", "examples_per_s", "elapsed_s")
SCALARS = ("lr", "train_loss", "train_acc", "val_acc", "examples_per_s")
RESULTS = "results.json"


@dataclass(frozen=True)
class ListOpsConfig:
    """A run of the recipe; the defaults are LRA's ListOps configuration, except the peak learning rate and
    gradient clipping (the study's best, see the module docstring)."""

    dim: int = _opt(512, "model width", "model")
    depth: int = _opt(4, "number of layers", "model")
    heads: int = _opt(8, "attention heads", "model")
    dim_head: int = _opt(64, "width of one attention head (even)", "model")
    ff_mult: int = _opt(2, "feed-forward width as a multiple of --dim (2: 1024 for width 512)", "model")
    block_size: int = _opt(16, "hierarchical attention block size Nr (a power of two >= 2)", "model")
    seq_len: int = _opt(2000, "longest input in tokens, <cls> included; longer inputs are truncated", "model")
    attention: str = _opt("hierarchical", "attention kind", "model", ("hierarchical", "dense"))
    pool: str = _opt(
        "cls", "classify from a <cls> token's features (LRA's choice), or from the mean of the real tokens'", "model",
        POOLS
    )
    dropout: float = _opt(0.1, "dropout in the feed-forward layers (LRA: 0.1)", "optimization")
    attn_dropout: float = _opt(
        0.0,
        "dropout on the attention weights (LRA: 0.1; the fused GPU kernels need 0, else the slower "
        "blocked PyTorch path runs)",
        "optimization",
    )
    batch_size: int = _opt(32, "sequences per optimizer step", "optimization")
    steps: int = _opt(5000, "optimizer steps in the whole run", "optimization")
    lr: float = _opt(
        1.5e-4, "peak learning rate, reached after the warmup (LRA: 0.05 / sqrt(1000) = 0.0015811)", "optimization"
    )
    warmup_steps: int = _opt(1000, "linear warmup steps; then the rate decays as 1/sqrt(step)", "optimization")
    weight_decay: float = _opt(0.1, "decoupled weight decay on matrices and embeddings", "optimization")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = off, as in LRA)", "optimization")
    data: str = _opt("data/listops", "directory of basic_{train,val,test}.tsv (see: lra listops prepare)", "data")
    seed: int = _opt(0, "seed for initialization and batch order", "data")
    eval_every: int = _opt(250, "validation accuracy (whole split) and a checkpoint every N steps", "evaluation")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:N, ...", "system")
    precision: str = _opt(
        "auto", "auto = bf16 autocast on GPUs that support it, else fp32", "system", ("auto", "bf16", "fp32")
    )


FIELDS = {f.name: f for f in dataclasses.fields(ListOpsConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: ListOpsConfig) -> None:
    def fail(name: str, expected: str):
        raise ConfigError(f"{flag(name)} must be {expected}, got {getattr(cfg, name)!r}")

    for name in ("dim", "depth", "heads", "dim_head", "ff_mult", "seq_len", "batch_size", "steps", "eval_every"):
        if getattr(cfg, name) < 1:
            fail(name, "a positive integer")
    for name in ("warmup_steps", "seed"):
        if getattr(cfg, name) < 0:
            fail(name, "an integer >= 0")
    if cfg.dim_head % 2:
        fail("dim_head", "even (rotary position embeddings rotate pairs of features)")
    if cfg.block_size < 2 or cfg.block_size & (cfg.block_size - 1):
        fail("block_size", "a power of two >= 2")
    if cfg.pool == "cls" and cfg.seq_len < 2:
        fail("seq_len", "at least 2 with --pool cls (the <cls> token and one more)")
    if not cfg.lr > 0:
        fail("lr", "a number > 0")
    for name in ("weight_decay", "grad_clip"):
        if not getattr(cfg, name) >= 0:
            fail(name, "a number >= 0")
    for name in ("dropout", "attn_dropout"):
        if not 0 <= getattr(cfg, name) < 1:
            fail(name, "in [0, 1)")
    for name in ("attention", "pool", "precision"):
        if getattr(cfg, name) not in FIELDS[name].metadata["choices"]:
            fail(name, f"one of {', '.join(FIELDS[name].metadata['choices'])}")


def build_classifier(cfg: ListOpsConfig) -> SequenceClassifier:
    body = HTransformer1D(
        num_tokens=len(listops.VOCAB),
        dim=cfg.dim,
        depth=cfg.depth,
        max_seq_len=cfg.seq_len,
        causal=False,
        heads=cfg.heads,
        dim_head=cfg.dim_head,
        block_size=cfg.block_size,
        ff_mult=cfg.ff_mult,
        attn_dropout=cfg.attn_dropout,
        ff_dropout=cfg.dropout,
        attention=cfg.attention,
    )
    return SequenceClassifier(body, listops.NUM_CLASSES, cfg.pool, hidden=cfg.dim * cfg.ff_mult)  # LRA: mlp_dim


def learning_rate(cfg: ListOpsConfig, step: int) -> float:
    """Linear warmup to --lr at --warmup-steps, then lr * sqrt(warmup / step) (steps count from 1)."""
    warmup = max(cfg.warmup_steps, 1)
    return cfg.lr * min(step / warmup, math.sqrt(warmup / step))


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


def load_split(data_dir: Path, split: str) -> Split:
    path = data_dir / listops.SPLITS[split]
    if not path.is_file():
        raise DataError(
            f"--data {data_dir}: no {path.name}. Create the ListOps files with: "
            f"h-transformer-1d lra listops prepare --out {data_dir}"
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


# --- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(out_dir: Path, cfg: ListOpsConfig, model, step: int, optimizer=None, progress=None) -> None:
    """model.safetensors, config.json and, with an optimizer, train_state.safetensors (optimizer and
    RNG states) and train_state.json (`progress`, param groups), each written atomically."""
    meta = {"format": str(checkpoint.FORMAT), "step": str(step)}
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    checkpoint.atomic_write(out_dir / checkpoint.MODEL, safetensors_bytes(weights, metadata=meta))
    record = {"format": checkpoint.FORMAT, "step": step, "task": TASK, "config": dataclasses.asdict(cfg)}
    checkpoint.atomic_write(out_dir / checkpoint.CONFIG, checkpoint.json_bytes(record))
    if optimizer is None:
        return
    state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{name}": t.detach().contiguous().cpu()
        for index, entries in state["state"].items()
        for name, t in entries.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    checkpoint.atomic_write(out_dir / checkpoint.STATE_TENSORS, safetensors_bytes(tensors, metadata=meta))
    record = {"format": checkpoint.FORMAT, "step": step, **(progress or {}), "param_groups": state["param_groups"]}
    checkpoint.atomic_write(out_dir / checkpoint.STATE_JSON, checkpoint.json_bytes(record))


def load_training_state(directory: Path, step: int, num_params: int) -> tuple[dict, dict, dict]:
    """(optimizer state dict, RNG states, progress) of the checkpoint in `directory` at `step`."""
    for name in (checkpoint.STATE_TENSORS, checkpoint.STATE_JSON):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} cannot be resumed: missing {name} (written by this version's train)")
    progress = checkpoint.read_json(directory / checkpoint.STATE_JSON)
    tensor_step, tensors = checkpoint.read_safetensors(directory / checkpoint.STATE_TENSORS)
    if {tensor_step, progress["step"]} != {step}:
        raise CheckpointError(f"{directory} mixes files of different saves: the last save was interrupted")
    groups = progress.pop("param_groups", None)
    if not isinstance(groups, list) or sorted(i for g in groups for i in g.get("params", [])) != list(range(num_params)):
        raise CheckpointError(f"{directory / checkpoint.STATE_JSON}: its optimizer does not fit the model")
    optimizer, rng = {"state": {}, "param_groups": groups}, {}
    for key, t in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            rng[rest] = t
        else:
            index, _, name = rest.partition(".")
            optimizer["state"].setdefault(int(index), {})[name] = t
    return optimizer, rng, progress


def load_checkpoint(directory: Path) -> tuple[ListOpsConfig, SequenceClassifier, int]:
    """The configuration, model (weights loaded, on the CPU) and step of a checkpoint written by train."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    for name in (checkpoint.MODEL, checkpoint.CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a complete checkpoint: missing {name}")
    record = checkpoint.read_json(directory / checkpoint.CONFIG)
    if record.get("task") != TASK or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{directory / checkpoint.CONFIG} is not a ListOps checkpoint (lra listops train)")
    values = record["config"]
    if set(values) != set(FIELDS):
        raise CheckpointError(f"{directory / checkpoint.CONFIG}: not a configuration of this version")
    try:
        cfg = ListOpsConfig(**values)
        validate(cfg)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{directory / checkpoint.CONFIG}: {e}") from None
    step, weights = checkpoint.read_safetensors(directory / checkpoint.MODEL)
    if step != record["step"]:
        raise CheckpointError(f"{directory} mixes files of steps {step} and {record['step']}: a save was interrupted")
    model = build_classifier(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{directory / checkpoint.MODEL} does not fit its config.json: {e}") from None
    return cfg, model, step


# --- training -------------------------------------------------------------------------------------


def device_name(rt: Runtime) -> str:
    return torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"


def train(cfg: ListOpsConfig, out_dir: Path, resume: bool = False) -> dict:
    """Train the recipe into `out_dir`; returns what results.json holds. `resume`: continue the
    checkpoint in `out_dir` with its own configuration (`cfg` is not used then)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("lra listops train runs in one process; start it without torchrun")
    saved = None
    if resume:
        cfg, saved_model, start_step = load_checkpoint(out_dir)
        saved = (saved_model.state_dict(), start_step)
    elif checkpoint.exists(out_dir):
        raise CheckpointError(f"--out {out_dir} already holds a checkpoint: choose another --out, or --resume it")
    validate(cfg)
    rt = start_runtime(cfg.device, cfg.precision)
    data_dir = Path(cfg.data)
    rt.print(f"reading {data_dir} ...")
    train_set, val_set, test_set = (load_split(data_dir, split).to(rt.device) for split in listops.SPLITS)
    if len(train_set) < cfg.batch_size:
        raise DataError(f"--batch-size {cfg.batch_size} is more than the {len(train_set)} training examples")
    cls = cfg.pool == "cls"
    truncated = sum(int((s.lengths > cfg.seq_len - cls).sum()) for s in (train_set, val_set, test_set))

    torch.manual_seed(cfg.seed)
    model = build_classifier(cfg).to(rt.device)
    num_params = sum(p.numel() for p in model.parameters())
    groups = decay_groups(model, cfg.weight_decay)
    optimizer = adamw(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    start_step, best, val_acc, elapsed = 0, (-1.0, 0), float("nan"), 0.0  # best: validation accuracy, step
    if saved is not None:
        weights, start_step = saved
        state, rng, progress = load_training_state(out_dir, start_step, sum(len(g["params"]) for g in groups))
        model.load_state_dict(weights)
        optimizer.load_state_dict(state)
        torch.set_rng_state(rng["cpu"])
        if rt.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], rt.device)
        best = (progress.get("best_val_acc", -1.0), progress.get("best_val_step", 0))
        val_acc, elapsed = progress.get("val_acc", float("nan")), progress.get("elapsed_s", 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)  # fmt: skip
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
            save_checkpoint(out_dir, cfg, model, step, optimizer, progress)
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
        "device": device_name(rt),
        "precision": "bf16" if rt.bf16 else "fp32",
        "torch": torch.__version__,
        "config": dataclasses.asdict(cfg),
    }
    checkpoint.atomic_write(out_dir / RESULTS, checkpoint.json_bytes(results))
    rt.print(
        f"done: test accuracy {test_acc:.4f} (validation {val_acc:.4f}, best {best[0]:.4f} at step {best[1]}), "
        f"{format_duration(train_time)}; checkpoint, metrics.csv, curves.png and {RESULTS} in {out_dir}"
    )
    return results
