"""`h_transformer_1d.load(path)`: the model of a checkpoint directory written by any of the applications."""

from pathlib import Path

import torch

from .config import LM
from .core import checkpoint
from .core.checkpoint import CheckpointError
from .lra.config import LISTOPS, PRETRAIN

APPS = {app.task: app for app in (LM, LISTOPS, PRETRAIN)}


def load(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The trained model of a run directory (`--out` of a train command), with its weights, in eval mode.

    - `h-transformer-1d train` -> an `AutoregressiveWrapper`: `model.generate(prompt, n)` samples bytes
      after a (B, N) or (N,) tensor of byte values, `model(x)` is the next-byte loss, and `model.net` is the
      causal `HTransformer1D` whose `model.net(x)` returns logits (B, N, 256).
    - `h-transformer-1d lra listops train` -> a `SequenceClassifier`: `model(x, mask)` maps token ids
      (B, N) to logits (B, 10).
    - `h-transformer-1d lra listops pretrain` -> its `MaskedTokenModel`: the bidirectional body with a head over
      the ListOps tokens and `<mask>`.

    The model is on `device` (default: the CPU). A path that is no complete checkpoint raises CheckpointError
    (a ValueError) saying what is missing.
    """
    directory = Path(path)
    task = checkpoint.task_of(directory)
    if task not in APPS:
        raise CheckpointError(f"{directory}: a checkpoint of an unknown task {task!r} (known: {', '.join(APPS)})")
    app = APPS[task]
    return app.model_of(checkpoint.load(directory, app), device)
