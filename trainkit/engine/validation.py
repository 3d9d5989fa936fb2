"""The validation monitor: evaluate a loader exactly across ranks, keep the best value of the
monitored metric and its step, stop early when it stops improving, and step a plateau
scheduler. The loop asks it to validate and hears back whether the metric improved; which
files that writes is the checkpoint manager's business."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainkit.core.devices import eval_mode, move_to
from trainkit.core.errors import ConfigError
from trainkit.core.logs import RunLogger
from trainkit.core.precision import Precision
from trainkit.core.ranks import Dist
from trainkit.core.schema import TrainerConfig
from trainkit.core.sharding import gathered
from trainkit.engine.state import TrainerState
from trainkit.schedulers import Schedule
from trainkit.tasks import Task


@dataclass
class Validation:
    """One validation's outcome: every metric, the monitored value, and whether it improved."""

    metrics: dict[str, float]
    value: float
    improved: bool


class ValidationMonitor:
    """Owns ``best_metric``, ``best_step`` and ``evals_without_improvement`` of the run's
    ``TrainerState``, the validation history of this process, and the plateau scheduler's step."""

    def __init__(self, options: TrainerConfig, task: Task, precision: Precision, dist: Dist,
                 logger: RunLogger, schedule: Schedule):
        self.options, self.task, self.precision, self.dist = options, task, precision, dist
        self.logger, self.schedule = logger, schedule
        self.history: list[dict[str, float]] = []
        self.last_step = -1  # the step of this process's last validation

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """Loss and task metrics over a whole loader, exact across ranks."""
        device = self.dist.device
        self.task.eval_start(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        with eval_mode(model), gathered(model):  # FSDP: full parameters, no collective per batch
            for batch in loader:
                count += self.task.count(batch)
                with self.precision.autocast():
                    batch = self.precision.prepare_batch(move_to(batch, device))
                    loss_sum += self.task.eval_step(model, batch).double()
        totals = self.dist.sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=device)]))
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        metrics = {"loss": loss, **self.task.eval_metrics(loss)}
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    def record(self, metrics: dict[str, float], state: TrainerState) -> Validation:
        """A validation's metrics (from ``evaluate``): log them, step a plateau scheduler,
        update the best metric and early stopping (``state.stop_reason = "early_stopping"``
        when patience runs out)."""
        metrics = {**metrics, "val/epoch_loss": metrics["val/loss"]}
        self.last_step = state.global_step
        self.history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        self.report(metrics, state)
        if self.options.monitor not in metrics:
            raise ConfigError(f"trainer.monitor={self.options.monitor!r} is not a validation metric; "
                              f"choose from {sorted(metrics)}")
        value = metrics[self.options.monitor]
        self.schedule.after_eval(metrics)
        improved = self.is_improvement(value, state.best_metric)
        if improved:
            state.best_metric, state.best_step = value, state.global_step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            self.check_patience(state)
        return Validation(metrics, value, improved)

    def report(self, metrics: dict[str, float], state: TrainerState) -> None:
        self.logger.log_metrics(metrics, state.global_step, state.epoch)
        self.logger.validation(metrics, state.global_step, state.epoch)
        text = self.task.eval_text()
        if text:
            self.logger.log_text("val/samples", text, state.global_step)
            self.logger.info("sample translations:\n%s", text)

    def is_improvement(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        delta = self.options.early_stopping_min_delta
        return value < best - delta if self.options.monitor_mode == "min" else value > best + delta

    def check_patience(self, state: TrainerState) -> None:
        patience = self.options.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            state.stop_reason = "early_stopping"
            self.logger.info("early stopping: %s did not improve for %d evaluations (best %.6g at step %s)",
                             self.options.monitor, patience, state.best_metric, state.best_step)

    def validated_at(self, step: int) -> bool:
        return self.last_step == step

    @property
    def validated(self) -> bool:
        """Whether this process has validated (without validation, best.pt is the latest)."""
        return bool(self.history)

    def final_metrics(self) -> dict[str, Any]:
        """The last validation's metrics without step and epoch (a run's final metrics)."""
        return {k: v for k, v in (self.history[-1] if self.history else {}).items() if k not in ("step", "epoch")}
