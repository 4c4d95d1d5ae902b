import os

import torch

# GPU kernels run on the CPU through Triton's interpreter when there is no GPU; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one tile configuration per kernel: tests check correctness, and autotuning would compile every one
os.environ.setdefault("H_TRANSFORMER_1D_AUTOTUNE", "0")
# Under pytest-xdist (`-n auto`) every core already runs a worker: one torch thread each, instead of
# every worker starting a thread per core and all of them contending.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

import pytest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
