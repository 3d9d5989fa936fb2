"""Learning-rate schedules stepped once per optimizer step, in closed form.

Each ``get_lr`` is a pure function of the step count, so a resumed run (which restores
``last_epoch``) sees exactly the same values as one that never stopped.
``last_epoch`` counts optimizer steps already taken: 0 during the first step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def check_warmup(warmup_steps: int, total_steps: int | None, minimum: int) -> None:
    """A warm-up longer than the run never reaches its peak: a config mistake."""
    if warmup_steps < minimum or (total_steps is not None and warmup_steps > total_steps):
        raise ValueError(f"warmup_steps={warmup_steps} must be between {minimum} and the run's "
                         f"{total_steps} optimizer steps")


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
    ``p = (s - warmup_steps) / max(1, total_steps - warmup_steps)``.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0, last_epoch: int = -1):
        check_warmup(warmup_steps, total_steps, minimum=0)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
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

    n = step + 1 counts optimizer steps from 1; the optimizer's base lr is ignored.
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int = 4000,
                 factor: float = 1.0, total_steps: int | None = None, last_epoch: int = -1):
        check_warmup(warmup_steps, total_steps, minimum=1)
        self.d_model = d_model
        self.warmup_steps = warmup_steps
        self.factor = factor
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step: int) -> float:
        n = step + 1
        return self.factor * self.d_model**-0.5 * min(n**-0.5, n * self.warmup_steps**-1.5)

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch) for _ in self.base_lrs]
