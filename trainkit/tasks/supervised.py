"""Supervised tasks on ``(inputs, targets)`` batches: classification and regression."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from trainkit.core.precision import widened
from trainkit.losses import loss_and_terms
from trainkit.tasks.base import MetricsMixin, Task, metric_specs


def use_sum_reduction(loss_fn: Callable) -> Callable:
    """Losses are summed per batch (the loop normalises per optimizer step)."""
    if getattr(loss_fn, "reduction", "sum") != "sum":
        loss_fn.reduction = "sum"
    return loss_fn


class SupervisedTask(Task):
    """``loss_fn(model(inputs), targets)`` summed over the batch; no metrics of its own."""

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        self.loss_fn = use_sum_reduction(loss_fn)

    def count(self, batch: Any) -> int:
        return len(batch[1])

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        # A composite loss hands back its named terms too (logged as train/loss/<name>).
        return loss_and_terms(self.loss_fn, model(inputs), targets)

    def eval_step(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        output = model(inputs)
        self.update_metrics(output, targets)
        return self.loss_fn(output, targets)

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        for metric in getattr(self, "metrics", {}).values():
            metric.update(output, targets)


# task.metrics: short names and/or {name: _target_ node} mappings, or one mapping (metric_specs).
Metrics = Sequence[str | Mapping[str, Any]] | Mapping[str, Any]
METRICS = {"classification": ("accuracy", "f1_macro", "top5_accuracy"), "regression": ("mse", "mae", "r2")}


def make_metric(name: str, num_classes: int | None, num_outputs: int = 1) -> Any:
    """A metric by name (``trainkit.metrics``: sums, exact across ranks)."""
    from trainkit import metrics

    factories: dict[str, Callable[[], Any]] = {
        "accuracy": lambda: metrics.Accuracy(),
        "f1_macro": lambda: metrics.MacroF1(num_classes),
        "top5_accuracy": lambda: metrics.Accuracy(top_k=5),
        "mse": lambda: metrics.MeanError(power=2),
        "mae": lambda: metrics.MeanError(power=1),
        "r2": lambda: metrics.R2Score(num_outputs),
    }
    return factories[name]()


class _NamedMetricsTask(MetricsMixin, SupervisedTask):
    kind = ""

    def __init__(self, loss_fn: Callable, metrics: Metrics = (), num_classes: int | None = None,
                 num_outputs: int = 1):
        super().__init__(loss_fn)
        self.metric_specs = metric_specs(metrics, METRICS[self.kind], self.kind)
        self.num_classes, self.num_outputs = num_classes, num_outputs

    def short_metric(self, short_name: str) -> Any:
        return make_metric(short_name, self.num_classes, self.num_outputs)


class ClassificationTask(_NamedMetricsTask):
    """Cross-entropy on class logits; metrics by short name (accuracy, f1_macro, top5_accuracy)
    or by ``_target_`` (torchmetrics), which are offered ``num_classes`` and ``task="multiclass"``
    and updated with the logits and the class ids."""

    kind = "classification"

    def __init__(self, loss_fn: Callable, num_classes: int, metrics: Metrics = ("accuracy",)):
        super().__init__(loss_fn, metrics, num_classes)
        self.metric_runtime = {"num_classes": num_classes, "task": "multiclass"}

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(widened(output), targets)


class RegressionTask(_NamedMetricsTask):
    """Real-valued targets (MSE loss); metrics by short name (mse, mae, r2) or by ``_target_``
    (torchmetrics), updated with the outputs and targets (one value per sample when there is
    one output). Those are offered no ``num_outputs``: in torchmetrics it makes a metric give
    one value per output column, and a metric here reports one number."""

    kind = "regression"

    def __init__(self, loss_fn: Callable, metrics: Metrics = ("mse",), out_features: int = 1):
        super().__init__(loss_fn, metrics, num_outputs=out_features)

    def count(self, batch: Any) -> int:
        return batch[1].numel()  # MSE sums over every target element

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(widened(output).squeeze(-1), targets.squeeze(-1))
