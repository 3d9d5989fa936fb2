"""Numeric precision and device choice: plain config data read by one function each.

fp32 gives a ``nullcontext`` autocast and a disabled scaler, so the loop text is the same
for every precision.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from trainkit.errors import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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


class Precision:
    """An autocast context for forward passes and a gradient scaler (disabled unless fp16)."""

    def __init__(self, device: torch.device, autocast_dtype: str | None = None,
                 grad_scaling: bool = False, name: str | None = None, param_dtype: str | None = None):
        self.name = name or autocast_dtype or "fp32"
        self.device_type = device.type
        self.dtype = DTYPES.get(autocast_dtype) if autocast_dtype else None
        if autocast_dtype and self.dtype is None:
            raise ConfigError(f"precision.autocast_dtype={autocast_dtype!r}: choose bfloat16, float16 or null")
        if self.dtype is not None:
            try:
                with torch.autocast(self.device_type, dtype=self.dtype):
                    pass
            except (RuntimeError, ValueError) as error:
                raise ConfigError(
                    f"precision={self.name} is not supported on device {device} by this torch "
                    f"({error}); use precision=fp32" + (" or precision=bf16" if self.dtype is torch.float16 else "")
                ) from None
            if self.dtype is torch.bfloat16 and device.type == "cpu" and not os.environ.get("TRAINKIT_QUIET_BF16"):
                log.warning("precision=bf16 on a CPU: correct, but often slower than fp32 on CPUs "
                            "without native bf16 instructions")
        try:
            self.scaler = torch.amp.GradScaler(self.device_type, enabled=grad_scaling)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(f"precision={self.name}: gradient scaling is not supported on {device} "
                              f"by this torch ({error}); use precision=bf16 or fp32") from None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in the precision's parameter dtype (unchanged unless fp64)."""
        return model

    def prepare_batch(self, batch: Any) -> Any:
        """A batch with its floating tensors in the parameter dtype (unchanged unless fp64)."""
        return batch

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)
