"""Rank handling, in one place: who this process is, and the few collectives the loop uses.

One process gives ``Dist`` with world size 1, whose collectives return their input and
whose ``no_sync`` does nothing, so the loop reads the same either way. Only the main rank
writes files; ``teardown`` runs in a ``finally``.

Every collective here must be called by every rank, the same number of times and in the
same order, also by a rank that has no data for it (an empty list, a zero count): one rank
that skips a collective leaves the others waiting forever.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from trainkit.core.devices import resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"  # ddp | fsdp (the model is sharded before its optimizer is made: core.sharding)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """FSDP: parameters, gradients and optimizer state sharded over the ranks of a group."""
        return self.strategy == "fsdp" and torch_dist.is_available() and torch_dist.is_initialized()

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model under torch.distributed, the model itself otherwise (also a
        model FSDP already sharded)."""
        if not self.enabled or self.sharded:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, skip_sync: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce (FSDP: reduce-scatter) on non-final accumulation micro-steps."""
        if self.sharded and skip_sync:
            return gradient_sync_off(model)
        if self.enabled and skip_sync:
            return model.no_sync()
        return nullcontext()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (exact: sums and counts, never means of means)."""
        if not self.enabled:
            return values
        on_host = values.device.type == "cpu" and self.host_comm_device.type == "cpu"
        reduced = values.to(values.device if on_host else self.comm_device, copy=True)
        torch_dist.all_reduce(reduced)
        return reduced.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (agree on stopping at one step)."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.host_comm_device)).item())

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @property
    def host_comm_device(self) -> torch.device:
        """Where numbers the host holds (a stop flag, a step's sample count) are reduced: on the
        CPU through the group's gloo part, so reading the result never waits for the GPU (each
        step reduces such numbers); on the GPU only when the group is NCCL alone."""
        if self.comm_device.type == "cuda" and torch_dist.is_initialized() and torch_dist.get_backend() == "nccl":
            return self.comm_device
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def teardown(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """FSDP2 keeps this micro-step's gradients unsharded on every rank, reduced with the next."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def under_torchrun() -> bool:
    """True in a worker that torchrun (or trainkit's self-launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend() -> str:
    # gloo for CPU tensors and, on CUDA machines, nccl for CUDA ones: one group serves both.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def setup(device_type: str = "auto", backend: str | None = None, strategy: str = "ddp") -> Dist:
    """Join the process group torchrun describes in the environment, or run alone. FSDP under
    torchrun joins a group even with one process (sharded checkpoints, one-GPU checks)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_type, local_rank)
    if world_size == 1 and not (strategy == "fsdp" and "TORCHELASTIC_RUN_ID" in os.environ):
        return Dist(device=device, strategy=strategy)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        init_group(backend)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.ERROR)  # other ranks print nothing but errors
    return Dist(torch_dist.get_rank(), world_size, local_rank, device, strategy)


def init_group(backend: str | None = None) -> None:
    """Join torchrun's process group. After ``--max-restarts`` restarts the agent's store
    still holds the dead workers' addresses, so keys get a per-attempt prefix."""
    backend = backend or default_backend()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        torch_dist.init_process_group(backend)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      world_size, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch_dist.PrefixStore(f"trainkit/attempt_{attempt}", agent_store)
    torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def agree_on_start_time() -> None:
    """Under torchrun, every rank composes the config itself: rank 0's start time, shared
    through the process group, makes ``${trainkit_now:...}`` (the run directory) identical."""
    if not torch_dist.is_initialized():
        init_group()
    stamp = [os.environ.get("TRAINKIT_RUN_TIME") or str(time.time())]
    torch_dist.broadcast_object_list(stamp, src=0)
    os.environ["TRAINKIT_RUN_TIME"] = stamp[0]


def sum_number(dist: Dist, value: float) -> float:
    """A host number summed over ranks (one small all-reduce under DDP, free otherwise)."""
    if not dist.enabled:
        return value
    return float(dist.sum(torch.tensor([float(value)], dtype=torch.float64, device=dist.host_comm_device)).item())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks of the process group, when one is up (for metric
    states held outside a ``Dist``); ``values`` itself when running alone."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return values
    comm_device = values.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(comm_device, copy=True)
    torch_dist.all_reduce(reduced)
    return reduced.to(values.device)


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order (for exact metrics over samples that
    each live on exactly one rank); the list itself when running alone."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return items
    parts: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
