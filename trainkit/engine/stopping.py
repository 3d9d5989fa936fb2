"""Stopping on request and on non-finite updates: the two ways a step can end a run early.

A stop request (``Trainer.request_stop``, SIGTERM or SIGUSR1) is honoured after the current
step on every rank together (``dist.any``), with a resumable last.pt; the run then raises
``Preempted`` (exit code 75). A non-finite loss or gradient is handled by
``trainer.nan_policy``: ``error`` stops at once, ``skip`` drops the update, up to
``trainer.max_consecutive_skips`` in a row; on an accelerator the check stays on the device
and is read only when the loop logs or saves (no wait for the device in the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from trainkit.core.errors import Preempted, TrainingFailed
from trainkit.core.logs import RunLogger
from trainkit.core.ranks import Dist
from trainkit.core.schema import TrainerConfig
from trainkit.core.stop import STOP
from trainkit.engine.meter import LossMeter
from trainkit.engine.state import TrainerState


class StopRequests:
    """Whether this run was asked to stop, agreed over the ranks."""

    def __init__(self, dist: Dist, logger: RunLogger):
        self.dist, self.logger = dist, logger
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def pending(self) -> bool:
        """Asked to stop: by ``request`` or by SIGTERM/SIGUSR1 (at any moment of the run)."""
        return self.requested or STOP.requested

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it)."""
        return self.dist.any(self.pending())

    def raise_if_agreed(self, where: str) -> None:
        """Raise ``Preempted`` on every rank if any rank was asked to stop (between phases,
        where the files on disk are already what a resume needs)."""
        if self.agreed():
            self.raise_preempted(where)

    def raise_preempted(self, where: str) -> None:
        self.logger.close()
        STOP.clear()  # handled: a later run in this process starts afresh
        self.requested = False
        raise Preempted(f"stopped on request {where}")


class NonFinitePolicy:
    """``trainer.nan_policy`` applied to each step's update, and the update itself.

    On a CPU the gradient norm is read on the host before the update (free: nothing to wait
    for). On an accelerator that read would stall the step until the device catches up, so
    the check stays on the device when the optimizer can skip by itself (the fused optimizers'
    ``found_inf``, the flag ``GradScaler`` hands them): the update is not applied, nothing is
    read, and the flags are read at ``settle``, which the loop calls before it logs, saves or
    ends an epoch. There the policy acts as on a CPU (counts, messages, ``error`` raises,
    naming the step), so a checkpoint never holds an unnoticed non-finite step.
    """

    def __init__(self, options: TrainerConfig, logger: RunLogger, meter: LossMeter,
                 last_checkpoint: Callable[[], Path | None], on_device: bool = False):
        self.options, self.logger, self.meter, self.last_checkpoint = options, logger, meter, last_checkpoint
        self.on_device = on_device
        self.pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, epoch, units, non-finite flag)

    def update(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_norm: torch.Tensor,
               state: TrainerState, units: float) -> bool | torch.Tensor:
        """Step the optimizer unless the step is non-finite; returns whether it stepped: a bool,
        or on the device path a device tensor read later (the step's losses are metered with it)."""
        if scaler.is_enabled():  # fp16: the scaler checks and skips by itself (sync-free when fused)
            state.consecutive_skips = 0
            scaler.step(optimizer)
            scaler.update()
            return True
        if not self.on_device:
            finite = math.isfinite(float(grad_norm))
            self.count(finite, state, state.global_step + 1, state.epoch)
            if finite:
                optimizer.step()
            return finite
        bad = ~torch.isfinite(grad_norm)
        optimizer.grad_scale, optimizer.found_inf = None, bad.to(torch.float32)  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
        self.pending.append((state.global_step + 1, state.epoch, units, bad))
        if len(self.pending) >= 1024:  # long logging windows: bounded memory, one read per 1,024 steps
            self.settle(state)
        return ~bad

    def settle(self, state: TrainerState) -> None:
        """Read the device-side flags of the steps since the last read (one wait for the device)
        and apply the policy to them in order; the units of skipped steps leave the meter."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        flags = torch.stack([bad for *_, bad in pending]).tolist()
        for (step, epoch, units, _), bad in zip(pending, flags):
            if bad:
                self.meter.drop_units(units)
            self.count(not bad, state, step, epoch)

    def count(self, finite: bool, state: TrainerState, step: int, epoch: int) -> None:
        """One step's outcome: a finite one ends a run of skips; a non-finite one raises under
        ``error`` (and after ``max_consecutive_skips`` in a row), otherwise is counted."""
        if finite:
            state.consecutive_skips = 0
            return
        last = self.last_checkpoint()
        where = f"non-finite loss or gradient at step {step} (epoch {epoch})"
        if self.options.nan_policy == "error":
            raise TrainingFailed(f"{where}; the update was not applied. Last good checkpoint: {last or 'none yet'} "
                                 "(trainer.nan_policy=skip drops such steps instead)")
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.logger.info("skipped the update of step %d: non-finite loss or gradient (%d skipped so far)",
                         step, state.skipped_steps)
        if state.consecutive_skips >= self.options.max_consecutive_skips:
            raise TrainingFailed(f"{where}: {state.consecutive_skips} non-finite steps in a row "
                                 f"(trainer.max_consecutive_skips={self.options.max_consecutive_skips}). "
                                 f"Last good checkpoint: {last or 'none yet'}")


def skips_on_device(device: torch.device, optimizer: torch.optim.Optimizer) -> bool:
    """Whether the non-finite check can stay on ``device``: an accelerator, and an optimizer
    that skips its own update on a device flag (fused Adam, AdamW, SGD, Adagrad)."""
    return device.type != "cpu" and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
