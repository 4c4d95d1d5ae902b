"""The device, precision and (under torchrun) process group of this process.

Several processes: `torchrun --nproc_per_node K -m h_transformer_1d ...` sets WORLD_SIZE, RANK and
LOCAL_RANK; each process then drives cuda:LOCAL_RANK (or the CPU through gloo), and process 0 alone prints.
"""

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import ConfigError


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

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type


def device_available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "mps":  # Apple GPUs: the backend says, whatever torch was built with
        return torch.backends.mps.is_available()
    backend = getattr(torch, kind, None)
    return bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of `--device NAME`: auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps; a device this
    machine lacks is a ConfigError. `auto` never picks mps: an Apple GPU is used when asked for."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if not device_available(device.type):
        raise ConfigError(f"--device {name}: {device.type} is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
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
    plot can abort the early one at exit (SIGABRT). Not while an exception propagates, when the other
    processes may never arrive (torchrun stops them)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()
