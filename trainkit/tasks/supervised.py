"""Supervised tasks on ``(inputs, targets)`` batches: classification and regression."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from trainkit.core.errors import ConfigError
from trainkit.core.precision import widened
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

    def __init__(self, loss_fn: Callable, metrics: Sequence[str] = (), num_classes: int | None = None,
                 num_outputs: int = 1):
        super().__init__(loss_fn)
        unknown = [name for name in metrics if name not in METRICS[self.kind]]
        if unknown:
            raise ConfigError(f"task.metrics: unknown {self.kind} metric {unknown[0]!r}; choose from {list(METRICS[self.kind])}")
        self.metric_names = list(metrics)
        self.num_classes, self.num_outputs = num_classes, num_outputs

    def make_metrics(self) -> dict[str, Any]:
        return {name: make_metric(name, self.num_classes, self.num_outputs) for name in self.metric_names}


class ClassificationTask(_NamedMetricsTask):
    """Cross-entropy on class logits; metrics by name: accuracy, f1_macro, top5_accuracy."""

    kind = "classification"

    def __init__(self, loss_fn: Callable, num_classes: int, metrics: Sequence[str] = ("accuracy",)):
        super().__init__(loss_fn, metrics, num_classes)

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(widened(output), targets)


class RegressionTask(_NamedMetricsTask):
    """Real-valued targets (MSE loss); metrics by name: mse, mae, r2."""

    kind = "regression"

    def __init__(self, loss_fn: Callable, metrics: Sequence[str] = ("mse",), out_features: int = 1):
        super().__init__(loss_fn, metrics, num_outputs=out_features)

    def count(self, batch: Any) -> int:
        return batch[1].numel()  # MSE sums over every target element

    def update_metrics(self, output: Tensor, targets: Tensor) -> None:
        super().update_metrics(widened(output).squeeze(-1), targets.squeeze(-1))
