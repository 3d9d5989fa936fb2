"""The small pieces the training loop uses: loss meters, the scheduler stepper, gradient
clipping, micro-batch grouping, resumable epochs and seeding.

Nothing here reads the config; ``trainkit.train`` wires these into the one loop.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from trainkit.distributed import Dist
from trainkit.errors import ConfigError

log = logging.getLogger("trainkit")


class Schedule:
    """Steps a per-step scheduler after every optimizer step, a plateau one after evaluation."""

    def __init__(self, scheduler: Any, monitor: str):
        self.scheduler, self.monitor = scheduler, monitor
        self.on_metric = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)

    def after_step(self) -> None:
        if self.scheduler is not None and not self.on_metric:
            self.scheduler.step()

    def after_eval(self, metrics: dict[str, float]) -> None:
        if self.on_metric:
            self.scheduler.step(metrics[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None and state:
            self.scheduler.load_state_dict(state)


class LossMeter:
    """Summed losses over the logging window (with named terms) and over the epoch, read
    only when logged. A step only keeps its detached loss tensor (no kernel, no sync); the
    kept tensors are summed on the device when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: list[torch.Tensor] = []  # step losses not yet summed into the two below
        self.window_loss = self.zero()
        self.epoch_loss = self.zero()
        self.epoch_units = 0.0
        self.reset()

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        """Start a new logging window."""
        self.window_loss = self.zero()
        self.terms: dict[str, list[torch.Tensor]] = {}
        self.units = 0.0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss_sum: torch.Tensor, count: int, terms: dict[str, torch.Tensor] | None = None) -> None:
        self.pending.append(loss_sum)
        if len(self.pending) >= 1024:  # long logging windows: bounded memory, one kernel per 1,024 steps
            self.fold()
        for name, value in (terms or {}).items():
            self.terms.setdefault(name, []).append(value.detach())
        self.units += count
        self.epoch_units += count

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def fold(self) -> None:
        """Sum the kept step losses (and terms) on the device: into the window and the epoch."""
        if self.pending:
            summed = total(self.pending, self.device)
            self.window_loss = self.window_loss + summed
            self.epoch_loss = self.epoch_loss + summed
            self.pending = []
        self.terms = {name: [total(values, self.device)] for name, values in self.terms.items()}

    def read(self, dist: Dist) -> tuple[dict[str, float], float]:
        """(mean loss and terms per unit over the window and all ranks, units counted);
        starts a new window."""
        self.fold()
        names = sorted(self.terms)
        units = torch.tensor(self.units, dtype=torch.float64, device=self.device)
        packed = torch.stack([self.window_loss, units, *[total(self.terms[n], self.device) for n in names]])
        totals = dist.sum(packed).tolist()  # .tolist() waits for the device
        per_unit = max(totals[1], 1.0)
        values = {"train/loss": totals[0] / per_unit}
        values.update({f"train/loss/{n}": v / per_unit for n, v in zip(names, totals[2:])})
        self.reset()
        return values, totals[1]

    def read_epoch(self, dist: Dist) -> float:
        """The mean loss per unit over the epoch and all ranks; starts a new epoch (the
        logging window carries on)."""
        self.fold()
        units = torch.tensor(self.epoch_units, dtype=torch.float64, device=self.device)
        loss, units = dist.sum(torch.stack([self.epoch_loss, units])).tolist()
        self.epoch_loss = self.zero()
        self.epoch_units = 0.0
        return loss / max(units, 1.0)


def total(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The float64 sum of scalar tensors (zero for none), on ``device``."""
    if not values:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(values).to(device=device, dtype=torch.float64).sum()


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm (before clipping); clipped to ``max_norm`` unless it is None."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def chunked(loader: Iterable, size: int) -> Iterator[list[Any]]:
    """Group micro-batches into optimizer steps; the last group of an epoch may be shorter."""
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def set_epoch(loader: Iterable, epoch: int, start: int) -> None:
    """Point a resumable batch plan at (epoch, first batch); a sampler with a one-argument
    ``set_epoch`` (``DistributedSampler``) is reshuffled for the epoch, which then restarts.

    The plan may sit on the loader's batch sampler (trainkit's own plans), on the sampler
    inside a ``BatchSampler`` (a user's ``DataLoader(sampler=DistributedSampler(...))``), or on
    the loader's sampler; the first one found with ``set_epoch`` is used.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (batch_sampler, getattr(batch_sampler, "sampler", None), getattr(loader, "sampler", None))
    plan = next((c for c in candidates if c is not None and hasattr(c, "set_epoch")), None)
    if plan is None:
        if start:
            log.warning("resuming mid-epoch with a loader that cannot skip batches: the epoch restarts")
        return
    try:
        plan.set_epoch(epoch, start)
    except TypeError:
        plan.set_epoch(epoch)  # a DistributedSampler: exact only at epoch boundaries
        if start:
            log.warning("resuming mid-epoch with a sampler that cannot skip batches: epoch %d restarts", epoch)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: Any) -> None:
    """Load a state dict, or explain which parameter names and shapes do not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("shape mismatch", mismatched), ("missing in checkpoint", missing),
                                      ("unexpected in checkpoint", unexpected)) if items]
        raise ConfigError(f"{source}: the checkpoint's model does not match the configured model ({'; '.join(parts)})")
    model.load_state_dict(weights)


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


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's global RNGs: ``seed`` itself on rank 0 (a one-process run is
    unchanged), a value mixed from (seed, rank) elsewhere, so ranks draw different dropout
    masks and augmentations. Data order does not come from these RNGs (the batch plans have
    their own generators seeded by ``seed``), and DDP copies rank 0's initial weights."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
