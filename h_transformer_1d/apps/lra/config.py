"""The ListOps recipe's configuration and the classifier it builds.

The defaults are LRA's ListOps setting: 4 layers, width 512, 8 heads, feed-forward 1024, batch 32,
5,000 steps, sequences of up to 2,000 tokens, Adam (0.9, 0.98, eps 1e-9) with decoupled weight
decay 0.1, a linear warmup over 1,000 steps then decay as 1/sqrt(step) (LRA's
"constant * linear_warmup * rsqrt_decay"), with two exceptions found best in our study
(docs/lra_listops.md): a peak learning rate of 1.5e-4 instead of LRA's 0.05/sqrt(1000) = 1.58e-3,
and the gradient norm clipped to 1 (LRA: no clipping). `--lr 0.0015811 --grad-clip 0` restores LRA's.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ...model import HTransformer1D
from ..core.checkpoint import App
from ..core.config import (
    MAX_DATA_BYTES,
    NON_NEGATIVE_NUMBER,
    POSITIVE,
    Check,
    ConfigError,
    body_kwargs,
    flag,
    option,
    shared,
)
from ..core.config import validate as validate_fields
from . import listops
from .model import POOLS, SequenceClassifier

SCHEDULES = ("rsqrt", "linear", "cosine")
MASK = len(listops.VOCAB)  # the <mask> token of pretraining, after the classifier's vocabulary


@dataclass(frozen=True)
class Recipe:
    """What a classifier run and a pretraining run share: the body, the optimization, the data."""

    dim: int = shared("dim", 512)
    depth: int = shared("depth", 4)
    heads: int = shared("heads", 8)
    dim_head: int = shared("dim_head", 64)
    kv_heads: int = shared("kv_heads", 0)
    ff_mult: int = shared("ff_mult", 2, "2: 1024 for width 512")
    block_size: int = shared("block_size", 16)
    seq_len: int = shared("seq_len", 2000, "<cls> included; longer inputs are truncated")
    attention: str = shared("attention", "hierarchical")
    dropout: float = shared("dropout", 0.1, "LRA: 0.1")
    attn_dropout: float = shared("attn_dropout", 0.0, "LRA: 0.1")
    batch_size: int = shared("batch_size", 32)
    steps: int = shared("steps", 5000)
    epochs: float = option(
        0.0,
        "the budget in passes over the training examples instead of --steps (exclusive with it): steps = "
        "ceil(E * examples / batch size); 0 = --steps",
        "optimization",
        checks=(NON_NEGATIVE_NUMBER,),
    )
    lr: float = shared("lr", 1.5e-4, "then --schedule (LRA's peak: 0.05 / sqrt(1000) = 0.0015811)")
    warmup_steps: int = shared("warmup_steps", 1000)
    schedule: str = option(
        "rsqrt",
        "after the warmup: rsqrt = lr * sqrt(warmup / step) (LRA's), linear or cosine = decay to zero at the end",
        "optimization",
        choices=SCHEDULES,
    )
    weight_decay: float = shared("weight_decay", 0.1)
    grad_clip: float = shared("grad_clip", 1.0, "LRA: 0")
    data: str = option("data/listops", "directory of basic_{train,val,test}.tsv (see: lra listops prepare)", "data")
    max_data_bytes: int = shared("max_data_bytes", MAX_DATA_BYTES, "per file")
    shuffle_operands: bool = option(
        False,
        "shuffle the operands of every operator in the training batches (MIN, MAX, MED and SM do not depend on "
        "their order: every label stays)",
        "data",
    )
    bucket: int = option(
        50,
        "batch training examples of similar lengths: sort windows of N batches by length, batch neighbours, "
        "shuffle the batches (1 = random batches)",
        "data",
        checks=(POSITIVE,),
    )
    seed: int = shared("seed", 0, "and the batch order")
    eval_every: int = shared("eval_every", 250, "validation accuracy on the whole split")
    device: str = shared("device", "auto")
    precision: str = shared("precision", "auto")


@dataclass(frozen=True)
class ListOpsConfig(Recipe):
    """A run of the recipe; the defaults are LRA's ListOps configuration, except the peak learning rate and
    gradient clipping (the study's best, see the module docstring)."""

    pool: str = option(
        "cls",
        "classify from a <cls> token's features (LRA's choice), or from the mean of the real tokens'",
        "model",
        choices=POOLS,
    )
    init_from: str = option(
        "",
        "start the body (embeddings and layers) from the last save of a `lra listops pretrain` run in this "
        "directory (Recipe B); the pooling head starts new",
        "model",
    )


@dataclass(frozen=True)
class PretrainConfig(Recipe):
    """A masked-token pretraining run on the training inputs (Recipe B); the body is the classifier's."""

    mask_rate: float = option(
        0.1,
        "the share of each input's tokens (never <cls> or padding, at least one) replaced by <mask> and predicted",
        "optimization",
        checks=(Check(lambda v: 0 < v < 1, "in (0, 1)"),),
    )


def validate(cfg: Recipe) -> None:
    validate_fields(cfg)
    if cfg.seq_len < 2 and getattr(cfg, "pool", "cls") == "cls":
        raise ConfigError(f"{flag('seq_len')} must be at least 2 with --pool cls (the <cls> token and one more)")


def build_body(cfg: Recipe, num_tokens: int) -> HTransformer1D:
    return HTransformer1D(num_tokens=num_tokens, causal=False, **body_kwargs(cfg))


def build_classifier(cfg: ListOpsConfig) -> SequenceClassifier:
    body = build_body(cfg, len(listops.VOCAB))
    return SequenceClassifier(body, listops.NUM_CLASSES, cfg.pool, hidden=cfg.dim * cfg.ff_mult)  # LRA: mlp_dim


def upgrade(values: dict) -> dict:
    """A configuration stored by an earlier version, with the settings it trained with: --data files of any
    size, random batches, no operand shuffling, LRA's schedule, a budget in steps."""
    earlier = {"max_data_bytes": MAX_DATA_BYTES, "bucket": 1, "shuffle_operands": False, "schedule": "rsqrt",
               "kv_heads": 0}
    return {**earlier, "epochs": 0.0, "init_from": "", **values}


class MaskedTokenModel(nn.Module):
    """``model(x, mask)`` maps token ids (B, N), <mask> among them, to logits over the tokens (B, N, V + 1): the
    classifier's body with its language-model head, so its `body.*` weights start a classifier."""

    def __init__(self, body: HTransformer1D):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x, mask=mask)


def build_pretrain_model(cfg: PretrainConfig) -> MaskedTokenModel:
    return MaskedTokenModel(build_body(cfg, MASK + 1))


def upgrade_pretrain(values: dict) -> dict:
    """A pretraining configuration stored before grouped-query attention: every head had its keys and values."""
    return {"kv_heads": 0, **values}


PROGRESS = {"val_acc": float, "best_val_acc": float, "best_val_step": int, "elapsed_s": float}
LISTOPS = App("listops", ListOpsConfig, build_classifier, "h-transformer-1d lra listops train", upgrade, PROGRESS)
PRETRAIN = App("listops-pretrain", PretrainConfig, build_pretrain_model, "h-transformer-1d lra listops pretrain",
               upgrade_pretrain, PROGRESS)  # fmt: skip
