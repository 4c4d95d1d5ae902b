import os

import torch

# GPU kernels run on the CPU through Triton's interpreter when there is no GPU; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one tile configuration per kernel: tests check correctness, and autotuning would compile every one
os.environ.setdefault("H_TRANSFORMER_1D_AUTOTUNE", "0")

import pytest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
