"""Learning-rate schedules stepped once per optimizer step, in closed form.

Each ``get_lr`` is a pure function of the step count, so a resumed run (which restores
``last_epoch``) sees exactly the same values as one that never stopped.
``last_epoch`` counts optimizer steps already taken: 0 during the first step.

A warm-up as long as the run or longer (``trainer.max_epochs=1`` on a preset tuned for more)
would end the run before the peak. It is shortened to a tenth of the run (at least one step)
with one warning naming ``scheduler.warmup_steps``, so a quick trial of any preset runs. The
shortened value depends only on the run's length, so a resumed run computes the same one.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from trainkit.core.errors import ConfigError

log = logging.getLogger("trainkit")


def fit_warmup(warmup_steps: int, total_steps: int | None, minimum: int, note: str = "") -> int:
    """The warm-up to use: ``warmup_steps``, or a tenth of the run (at least 1) when it is not
    shorter than ``total_steps`` optimizer steps (``note`` ends the warning). Below ``minimum``
    is a config mistake."""
    if warmup_steps < minimum:
        raise ConfigError(f"scheduler.warmup_steps={warmup_steps}: must be at least {minimum}")
    if total_steps is None or warmup_steps < total_steps:
        return warmup_steps
    shortened = max(1, total_steps // 10)
    log.warning("scheduler.warmup_steps=%d is not shorter than the run (%d optimizer steps): shortened to %d, "
                "a tenth of the run%s; set scheduler.warmup_steps below %d to choose", warmup_steps, total_steps,
                shortened, note, total_steps)
    return shortened


class Constant(LRScheduler):
    """The optimizer's own learning rate, unchanged."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return list(self.base_lrs)


class WarmupCosine(LRScheduler):
    """Linear warm-up to the base lr over ``warmup_steps``, then cosine decay to ``min_lr``.

    At step s (0-based): ``base * (s + 1) / warmup_steps`` while s < warmup_steps, then
    ``min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = (s - warmup_steps) / max(1, total_steps - warmup_steps)``. A warm-up not shorter
    than the run is shortened to a tenth of it (see the module docstring).
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, last_epoch: int = -1):
        self.total_steps = total_steps
        self.warmup_steps = fit_warmup(warmup_steps, total_steps, minimum=0)
        self.min_lr = min_lr
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base_lr: float, step: int) -> float:
        if step < self.warmup_steps:
            return base_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch) for base in self.base_lrs]


class Noam(LRScheduler):
    """Vaswani et al. (2017): ``factor * d_model**-0.5 * min(n**-0.5, n * warmup_steps**-1.5)``.

    n = step + 1 counts optimizer steps from 1; the optimizer's base lr is ignored. The peak,
    ``factor * (d_model * warmup_steps)**-0.5`` at n = warmup_steps, depends on the warm-up: when
    a warm-up not shorter than the run (``total_steps``) is shortened, ``factor`` is scaled by
    ``sqrt(shortened / warmup_steps)`` so the peak stays the configured one.
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000,
                 factor: float = 1.0, total_steps: int | None = None, last_epoch: int = -1):
        self.d_model = d_model
        self.warmup_steps = fit_warmup(warmup_steps, total_steps, minimum=1,
                                       note=" (factor scaled to keep the peak learning rate)")
        self.factor = factor * math.sqrt(self.warmup_steps / warmup_steps)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        n = step + 1
        return self.factor * self.d_model**-0.5 * min(n**-0.5, n * self.warmup_steps**-1.5)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.base_lrs]


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
