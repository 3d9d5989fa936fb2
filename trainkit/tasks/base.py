"""The task contract: how a batch becomes a summed loss, a count, and evaluation metrics.

A task returns the loss *summed* over the batch together with the number of units it
summed (samples, or target tokens for sequences). The loop divides by the count of the
whole optimizer step (all micro-batches, all ranks), which makes gradient accumulation
and DDP equal to one large batch, whatever the batch lengths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.metrics import build_metric, metric_value


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


def metric_specs(metrics: Any, short_names: Sequence[str], kind: str) -> dict[str, Any]:
    """``task.metrics`` as ``{name: short name or _target_ node}``, in order. Accepted: a list
    whose items are short names or mappings ``{name: node}``, or one mapping ``{name: node}``;
    a node is a short name, a mapping with a ``_target_``, or null (left out). Raises
    ConfigError for an unknown short name (naming the closest), a repeated name, or a node
    without a ``_target_``."""
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        items = [pair for item in metrics for pair in (item.items() if isinstance(item, Mapping) else [(item, item)])]
    else:
        raise ConfigError(f"task.metrics={metrics!r}: expected a list of names (e.g. [{short_names[0]}]) "
                          "or a mapping of names to metrics")
    specs: dict[str, Any] = {}
    for name, spec in items:
        path = f"task.metrics.{name}"
        if name in specs:
            raise ConfigError(f"{path}: named twice; give each metric its own name")
        if isinstance(spec, str) and spec not in short_names:
            raise ConfigError(f"task.metrics: unknown {kind} metric {spec!r}{did_you_mean(spec, short_names)}; choose "
                              f"from {list(short_names)} or name a torchmetrics class, e.g. "
                              "{auroc: {_target_: torchmetrics.classification.MulticlassAUROC}}")
        if spec is not None and not isinstance(spec, str) and not (
                isinstance(spec, Mapping) and isinstance(spec.get("_target_"), str)):
            raise ConfigError(f"{path}: expected a short name ({', '.join(short_names)}), a node with a "
                              f"_target_ naming a metric class, or null (got {spec!r})")
        if spec is not None:
            specs[str(name)] = spec if isinstance(spec, str) else dict(spec)
    return specs


class MetricsMixin:
    """Named metrics, each exact across ranks. A short name is one of trainkit's own
    (``short_metric``: sums, made afresh for every evaluation, all-reduced at compute). A
    ``_target_`` node (a torchmetrics class) is built once, at the first evaluation, so its
    library is imported only then, with ``metric_runtime`` filling the arguments the data
    decides; it is reset before each later evaluation and syncs its own states at compute."""

    metric_specs: Mapping[str, Any] = {}  # name -> short name | _target_ node (``metric_specs()``)
    metric_runtime: Mapping[str, Any] = {}  # e.g. num_classes, offered to _target_ metrics

    def short_metric(self, short_name: str) -> Any:
        raise NotImplementedError

    def eval_start(self, device: torch.device) -> None:
        built = self.__dict__.setdefault("built_metrics", {})
        self.metrics = {}
        for name, spec in self.metric_specs.items():
            if isinstance(spec, str):
                metric = self.short_metric(spec)
            else:
                if name not in built:
                    built[name] = build_metric(spec, f"task.metrics.{name}", self.metric_runtime)
                metric = built[name]
                metric.reset()
            self.metrics[name] = metric.to(device)

    def eval_metrics(self, loss: float) -> dict[str, float]:
        # Every rank computes every metric in the same order: compute() is a collective under DDP.
        return {name: metric_value(metric, f"task.metrics.{name}") for name, metric in self.metrics.items()}


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
