"""Numeric precision: plain config data read by one class.

fp32 gives a ``nullcontext`` autocast and a disabled scaler, so the loop text is the same
for every precision. fp64 (``param_dtype: float64``, for numerical checks) casts the model's
floating parameters and buffers once, in place, and each batch's floating tensors; every
other precision leaves models and batches untouched, at no per-step cost.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from trainkit.core.errors import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# A precision by name (the Python API's ``Trainer(precision="bf16")``): (autocast dtype,
# gradient scaling, parameter dtype), as conf/precision/*.yaml set them.
NAMED = {"fp32": (None, False, None), "bf16": ("bfloat16", False, None), "fp16": ("float16", True, None),
         "fp64": (None, False, "float64")}



def widened(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32 for a loss or metric computed outside reduced precision, or as they
    are when already float64 (``precision=fp64``: widening must never narrow)."""
    return values if values.dtype == torch.float64 else values.float()


class Precision:
    """An autocast context for forward passes, a gradient scaler (disabled unless fp16), and
    the parameter dtype models and batches are cast to (``None``: left as they are)."""

    @classmethod
    def named(cls, name: str, device: torch.device) -> Precision:
        if name not in NAMED:
            raise ConfigError(f"precision={name!r}: choose one of {', '.join(NAMED)}")
        autocast_dtype, grad_scaling, param_dtype = NAMED[name]
        return cls(device, autocast_dtype, grad_scaling, name, param_dtype)

    def __init__(self, device: torch.device, autocast_dtype: str | None = None,
                 grad_scaling: bool = False, name: str | None = None, param_dtype: str | None = None):
        self.name = name or autocast_dtype or param_dtype or "fp32"
        self.device_type = device.type
        self.param_dtype = PARAM_DTYPES.get(param_dtype) if param_dtype else None
        if param_dtype and self.param_dtype is None:
            raise ConfigError(f"precision.param_dtype={param_dtype!r}: choose float64, float32 or null")
        if self.param_dtype is not None and autocast_dtype:
            raise ConfigError(f"precision.param_dtype={param_dtype} with precision.autocast_dtype={autocast_dtype}: "
                              "autocast would compute in the lower precision; use precision=fp64 alone "
                              "(or set precision.param_dtype=null)")
        if self.param_dtype is torch.float64 and device.type == "mps":
            raise ConfigError("precision=fp64: MPS has no float64; use device=cpu (or device=cuda)")
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
        """The same model, its floating parameters and buffers cast to the parameter dtype.

        Integer buffers stay as they are. Each tensor's data is replaced in place (whatever
        ``torch.__future__`` says about ``Module.to``), so the ``Parameter`` objects an
        optimizer already holds are the model's own; cast before the optimizer's first step
        (its state takes the dtype of the parameters when it is created).
        """
        if self.param_dtype is not None:
            for tensor in (*model.parameters(), *model.buffers()):
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(self.param_dtype)
                    if tensor.grad is not None:
                        tensor.grad = tensor.grad.to(self.param_dtype)
        return model

    def prepare_batch(self, batch: Any) -> Any:
        """The batch with its floating tensors (also inside dicts, lists and tuples) in the
        parameter dtype; integer tensors and other values as they are. Without a parameter
        dtype the batch itself, untouched."""
        if self.param_dtype is None:
            return batch
        return cast_floating(batch, self.param_dtype)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it cast to ``dtype`` (dicts, lists, tuples and
    named tuples are rebuilt; anything else is returned as is)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(cast_floating(item, dtype) for item in value))
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(item, dtype) for item in value)
    return value
