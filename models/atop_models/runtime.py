"""Where a run executes: the device and, under torchrun, the DDP rank (training and evaluation alike)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP-wrap a trained module when running under torchrun; the module itself otherwise."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (every rank must call it with the same keys)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}

    def spread(self, value: float) -> float:
        """max - min of a scalar over the ranks; 0 on one process."""
        if not self.distributed:
            return 0.0
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0] + t[1])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_runtime(device: str = "auto") -> Runtime:
    """Pick the device ('auto': CUDA when present, else CPU) and join the process group torchrun set up.

    torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on CPU (so DDP tests run on CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed shapes per run: let cuDNN pick the fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls/convs: ~8x faster, ample for training
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world_size)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
