"""Rank handling, in one place: who this process is, and the few collectives the loop uses.

One process gives ``Dist`` with world size 1, whose collectives return their input and
whose ``no_sync`` does nothing, so the loop reads the same either way. Only the main rank
writes files; ``teardown`` runs in a ``finally``.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from trainkit.precision import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model under torch.distributed, the model itself otherwise."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, skip_sync: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce on non-final accumulation micro-steps."""
        if self.enabled and skip_sync:
            return model.no_sync()
        return nullcontext()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (exact: sums and counts, never means of means)."""
        if not self.enabled:
            return values
        reduced = values.to(self.comm_device, copy=True)
        torch_dist.all_reduce(reduced)
        return reduced.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (agree on stopping at one step)."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.comm_device)).item())

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def teardown(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup(device_type: str = "auto", backend: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_type, local_rank)
    if world_size == 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return Dist(torch_dist.get_rank(), world_size, local_rank, device)


def sum_number(dist: Dist, value: float) -> float:
    """A host number summed over ranks (one small all-reduce under DDP, free otherwise)."""
    if not dist.enabled:
        return value
    return float(dist.sum(torch.tensor([float(value)], dtype=torch.float64, device=dist.comm_device)).item())
