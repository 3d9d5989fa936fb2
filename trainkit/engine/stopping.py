"""Stopping on request and on non-finite updates: the two ways a step can end a run early.

A stop request (``Trainer.request_stop``, SIGTERM or SIGUSR1) is honoured after the current
step on every rank together (``dist.any``), with a resumable last.pt; the run then raises
``Preempted`` (exit code 75). A non-finite loss or gradient is handled by
``trainer.nan_policy``: ``error`` stops at once, ``skip`` drops the update, up to
``trainer.max_consecutive_skips`` in a row.
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
    """``trainer.nan_policy`` applied to one step's gradient norm, before the update."""

    def __init__(self, options: TrainerConfig, logger: RunLogger):
        self.options, self.logger = options, logger

    def allows_update(self, grad_norm: torch.Tensor, scaler_checks: bool, state: TrainerState,
                      last_checkpoint: Callable[[], Path | None]) -> bool:
        """fp16's scaler checks (and skips) by itself; otherwise the norm is read: free on CPU,
        where no sync exists, and a 4-byte read per step on an accelerator (as GradScaler does).
        ``last_checkpoint`` gives the last good checkpoint, named when the run stops."""
        if scaler_checks or math.isfinite(float(grad_norm)):
            state.consecutive_skips = 0
            return True
        last = last_checkpoint()
        where = f"non-finite loss or gradient at step {state.global_step + 1} (epoch {state.epoch})"
        if self.options.nan_policy == "error":
            raise TrainingFailed(f"{where}; the update was not applied. Last good checkpoint: {last or 'none yet'} "
                                 "(trainer.nan_policy=skip drops such steps instead)")
        state.skipped_steps += 1
        state.consecutive_skips += 1
        self.logger.info("skipped the update of step %d: non-finite loss or gradient (%d skipped so far)",
                         state.global_step + 1, state.skipped_steps)
        if state.consecutive_skips >= self.options.max_consecutive_skips:
            raise TrainingFailed(f"{where}: {state.consecutive_skips} non-finite steps in a row "
                                 f"(trainer.max_consecutive_skips={self.options.max_consecutive_skips}). "
                                 f"Last good checkpoint: {last or 'none yet'}")
        return False
