"""Where tensors and modules run: choosing the device, moving batches there, evaluation
mode for a forward pass, and the peak memory a device reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainkit.core.errors import ConfigError


def resolve_device(kind: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks cuda > mps > cpu; each rank of a CUDA job takes GPU ``local_rank``."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda: no CUDA device is available here; use device=cpu or device=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps: MPS is not available here; use device=cpu or device=auto")
    if kind not in ("cpu", "mps"):
        raise ConfigError(f"device.type={kind!r}: choose auto, cpu, cuda or mps")
    return torch.device(kind)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode, restoring each submodule's own flag after.

    ``model.train(previous)`` would not do: it would flatten submodules that the caller had
    deliberately put in a different mode (e.g. a frozen encoder kept in eval).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
