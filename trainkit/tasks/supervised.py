"""Supervised tasks on ``(inputs, targets)`` batches: classification and regression."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from trainkit.errors import ConfigError
from trainkit.losses import loss_and_terms
from trainkit.tasks.base import MetricsMixin, Task


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


METRICS = {"classification": ("accuracy", "f1_macro", "top5_accuracy"), "regression": ("mse", "mae", "r2")}


def make_metric(name: str, num_classes: int | None) -> Any:
    """A torchmetrics metric by name; torchmetrics (slow to import) loads at the first evaluation."""
    import torchmetrics

    multiclass = dict(task="multiclass", num_classes=num_classes)
    factories: dict[str, Callable[[], Any]] = {
        "accuracy": lambda: torchmetrics.Accuracy(**multiclass),
        "f1_macro": lambda: torchmetrics.F1Score(average="macro", **multiclass),
        "top5_accuracy": lambda: torchmetrics.Accuracy(top_k=min(5, num_classes or 5), **multiclass),
        "mse": torchmetrics.MeanSquaredError,
        "mae": torchmetrics.MeanAbsoluteError,
        "r2": torchmetrics.R2Score,
    }
    return factories[name]()


class _NamedMetricsTask(MetricsMixin, SupervisedTask):
    kind = ""

    def __init__(self, loss_fn: Callable, metrics: Sequence[str] = (), num_classes: int | None = None):
        super().__init__(loss_fn)
        unknown = [name for name in metrics if name not in METRICS[self.kind]]
        if unknown:
            raise ConfigError(f"task.metrics: unknown {self.kind} metric {unknown[0]!r}; choose from {list(METRICS[self.kind])}")
        self.metric_names = list(metrics)
        self.num_classes = num_classes

    def make_metrics(self) -> dict[str, Any]:
        return {name: make_metric(name, self.num_classes) for name in self.metric_names}


class ClassificationTask(_NamedMetricsTask):
    """Cross-entropy on class logits; metrics by name: accuracy, f1_macro, top5_accuracy."""

    kind = "classification"

    def __init__(self, loss_fn: Callable, num_classes: int, metrics: Sequence[str] = ("accuracy",)):
        super().__init__(loss_fn, metrics, num_classes)

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(output.float(), targets)


class RegressionTask(_NamedMetricsTask):
    """Real-valued targets (MSE loss); metrics by name: mse, mae, r2."""

    kind = "regression"

    def __init__(self, loss_fn: Callable, metrics: Sequence[str] = ("mse",)):
        super().__init__(loss_fn, metrics)

    def count(self, batch: Any) -> int:
        return batch[1].numel()  # MSE sums over every target element

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(output.float().squeeze(-1), targets.squeeze(-1))
