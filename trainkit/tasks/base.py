"""The task contract: how a batch becomes a summed loss, a count, and evaluation metrics.

A task returns the loss *summed* over the batch together with the number of units it
summed (samples, or target tokens for sequences). The loop divides by the count of the
whole optimizer step (all micro-batches, all ranks), which makes gradient accumulation
and DDP equal to one large batch, whatever the batch lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.core.errors import ConfigError


def first_tensor(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return first_tensor(next(iter(batch.values())))
    return first_tensor(batch[0])


class Task:
    """Base task: subclasses define ``loss_sum`` and, for metrics, ``update_metrics``."""

    count_unit = "samples"  # what ``count`` counts, for throughput logs

    def count(self, batch: Any) -> int:
        """Units the summed loss of this batch covers; read on the host, before the step."""
        return len(first_tensor(batch))

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss summed over the batch, and named extra terms (also sums) to log."""
        raise NotImplementedError

    def forward_backward(self, model: nn.Module, batch: Any, normaliser: float,
                         precision: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward under autocast, backward of ``loss_sum / normaliser`` through the scaler.
        Tasks that need another order of work (gradient caching) override this."""
        with precision.autocast():
            loss_sum, terms = self.loss_sum(model, batch)
        precision.scaler.scale(loss_sum / normaliser).backward()
        return loss_sum, terms

    # Evaluation: loss through ``loss_sum``; metrics are accumulated only here.
    def eval_start(self, device: torch.device) -> None:
        """Reset metric state before an evaluation pass."""

    def eval_step(self, model: nn.Module, batch: Any) -> Tensor:
        """Update metrics with one batch; return its summed loss."""
        return self.loss_sum(model, batch)[0]

    def eval_metrics(self, loss: float) -> dict[str, float]:
        """Metrics over every batch seen since ``eval_start``, across all ranks; ``loss`` is
        the pass's mean loss."""
        return {}

    def eval_text(self) -> str | None:
        """Text to show after an evaluation (for example sample translations), or None."""
        return None


class MetricsMixin:
    """Named metrics (``trainkit.metrics``), summed across ranks when computed."""

    metric_names: Sequence[str] = ()

    def make_metrics(self) -> dict[str, Any]:
        raise NotImplementedError

    def eval_start(self, device: torch.device) -> None:
        self.metrics = {name: metric.to(device) for name, metric in self.make_metrics().items()}

    def eval_metrics(self, loss: float) -> dict[str, float]:
        # .compute() sums the metric state over ranks under DDP (exact, no mean of means).
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}


class ModelLossTask(Task):
    """For models whose forward returns their own (mean) loss, as Hugging Face models do.

    The batch is passed as keyword arguments (a dict), positionally (a tuple) or as is (a
    tensor); the loss is read from ``output.loss`` or ``output["loss"]`` and scaled by the
    batch size into a sum. ``task=model_loss`` is used without a loss (``~loss``).
    """

    def __init__(self, loss_fn: Any = None):
        if loss_fn is not None:
            raise ConfigError(f"task=model_loss: the model computes its own loss, so loss must be null "
                              f"(got loss {type(loss_fn).__name__}); remove it with ~loss on the command "
                              "line, or '- override /loss: null' in an experiment's defaults")

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(batch, dict):
            output = model(**batch)
        else:
            output = model(batch) if isinstance(batch, Tensor) else model(*batch)
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None:
            raise ConfigError(f"task=model_loss: the model's output ({type(output).__name__}) has no loss; its "
                              "forward must return one as output.loss or output['loss'] (a Hugging Face model "
                              "needs labels in the batch)")
        return loss * self.count(batch), {}
