"""``distributed.strategy=fsdp``: the model's parameters, gradients and optimizer state sharded
over the ranks with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each block is its own FSDP unit (its parameters are gathered just before its forward and freed
after), then the root takes what is left (embeddings, heads). The blocks are what the model
names (``fsdp_blocks()``: Transformer layers, MLP blocks, VAE parts), or the module classes in
``distributed.fsdp_wrap`` (an HF model's layer class; by default its ``_no_split_modules``).
Sharding happens before the optimizer is built, because ``fully_shard`` replaces the
parameters with sharded ones (``run.build`` calls ``shard_model``). With ``precision=bf16|fp16``
FSDP's own mixed precision computes in that dtype and reduces gradients in fp32. Evaluation
gathers the full parameters once (``gathered``), so ranks need not run equal batch counts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainkit.core.errors import ConfigError


def block_modules(model: nn.Module, wrap: Sequence[str]) -> list[nn.Module]:
    """The model's FSDP units: modules whose class name (or ``module.Class``) is in ``wrap``, else
    what ``model.fsdp_blocks()`` returns, else the classes of an HF model's ``_no_split_modules``
    (none: the root alone is one unit)."""
    names = list(wrap or [])
    if not names and hasattr(model, "fsdp_blocks"):
        return list(model.fsdp_blocks())
    names = names or list(getattr(model, "_no_split_modules", None) or [])
    found = [module for module in model.modules() if module is not model and
             (type(module).__name__ in names or f"{type(module).__module__}.{type(module).__name__}" in names)]
    unmatched = [name for name in wrap or [] if not any(name.split(".")[-1] == type(m).__name__ for m in found)]
    if unmatched:
        classes = sorted({type(module).__name__ for module in model.modules()})
        raise ConfigError(f"distributed.fsdp_wrap: no module of class {unmatched[0]!r} in the model "
                          f"(its classes: {', '.join(classes[:30])})")
    return found


def shard_model(model: nn.Module, device: torch.device, wrap: Sequence[str] = (), reshard_after_forward: bool = True,
                compute_dtype: str | None = None, param_dtype: str | None = None) -> nn.Module:
    """``fully_shard`` each block, then the root, on a 1-D mesh of all ranks; returns the model
    (sharded in place, now an ``FSDPModule``). ``param_dtype`` (``precision=fp64``) converts the
    parameters first, as ``Precision.prepare_model`` does for an unsharded model."""
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    dtype = getattr(torch, compute_dtype) if compute_dtype else None
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    options: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": policy}
    model.to(device, dtype=getattr(torch, param_dtype) if param_dtype else None)
    blocks = block_modules(model, wrap)
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    model.trainkit_reshard_after_forward = reshard_after_forward  # what gathered() puts back
    return model


def compiled(model: nn.Module) -> nn.Module:
    """``trainer.compile=true``: ``torch.compile(model)``, or under FSDP the model itself with
    every sharded block's forward compiled in place. ``torch.compile`` of a sharded root compiles
    nothing (Dynamo meets a block's FSDP hooks, which it must not trace, and runs the whole
    forward eagerly), so each block's own forward is compiled instead: its all-gather and
    reduce-scatter hooks run eagerly around it, and the root's own layers (embeddings, heads)
    stay eager."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return torch.compile(model)
    for block in model.modules():
        if block is not model and isinstance(block, FSDPModule):
            block.forward = torch.compile(block.forward)  # an instance attribute: state_dict names unchanged
    return model


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """While inside, a sharded model holds its full parameters on every rank and its forwards
    (and direct calls such as ``encode``/``decode`` in beam search) need no collective: ranks
    may then run different numbers of batches, as evaluation over unevenly split data does.
    A model that is not sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:  # the same all-gathers, in the same order, on every rank
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(getattr(model, "trainkit_reshard_after_forward", True))
        for unit in units:
            unit.reshard()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: sharded gradients give a replicated DTensor."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm
