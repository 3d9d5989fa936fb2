"""Evaluation metrics kept as sums, so they are exact across ranks with one all-reduce.

Each metric holds a float64 vector of sufficient statistics (correct and total counts,
per-class true/false positives, sums of errors and squares), adds each batch's statistics
on the device, and turns the sums into a value once at ``compute()``. Under
torch.distributed the sums of every rank are added first: the result equals one process
evaluating every sample, never a mean of per-rank means.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainkit.core.errors import ConfigError
from trainkit.core.ranks import sum_over_ranks


class SumMetric:
    """A metric whose state is a vector of ``size`` sums."""

    def __init__(self, size: int):
        self.state = torch.zeros(size, dtype=torch.float64)

    def to(self, device: torch.device | str) -> SumMetric:
        self.state = self.state.to(device)
        return self

    def update(self, output: Tensor, targets: Tensor) -> None:
        self.state += self.statistics(output.detach(), targets)

    def compute(self) -> float:
        return float(self.value(sum_over_ranks(self.state).cpu()))

    def statistics(self, output: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def value(self, state: Tensor) -> Tensor:
        raise NotImplementedError


class Accuracy(SumMetric):
    """The share of samples whose target is among the ``top_k`` highest logits."""

    def __init__(self, top_k: int = 1):
        super().__init__(2)  # correct, total
        self.top_k = top_k

    def statistics(self, output: Tensor, targets: Tensor) -> Tensor:
        top = output.topk(min(self.top_k, output.shape[-1]), dim=-1).indices
        correct = (top == targets.unsqueeze(-1)).any(-1).sum()
        return torch.stack([correct.double(), torch.tensor(float(len(targets)), dtype=torch.float64, device=output.device)])

    def value(self, state: Tensor) -> Tensor:
        return state[0] / state[1].clamp(min=1)


class MacroF1(SumMetric):
    """F1 per class from true positives, false positives and false negatives, averaged over
    the classes that occur (as target or prediction)."""

    def __init__(self, num_classes: int):
        super().__init__(3 * num_classes)
        self.num_classes = num_classes

    def statistics(self, output: Tensor, targets: Tensor) -> Tensor:
        predicted = output.argmax(-1)
        hits = self.per_class(targets[predicted == targets])
        return torch.cat([hits, self.per_class(predicted) - hits, self.per_class(targets) - hits])

    def per_class(self, labels: Tensor) -> Tensor:
        return torch.bincount(labels, minlength=self.num_classes).double()

    def value(self, state: Tensor) -> Tensor:
        tp, fp, fn = state.view(3, self.num_classes)
        seen = (tp + fp + fn) > 0
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        return f1[seen].mean() if seen.any() else torch.tensor(0.0)


class MeanError(SumMetric):
    """Mean squared (``power=2``) or absolute (``power=1``) error per target element."""

    def __init__(self, power: int):
        super().__init__(2)  # summed error, elements
        self.power = power

    def statistics(self, output: Tensor, targets: Tensor) -> Tensor:
        errors = (output.double() - targets.double()).abs().pow(self.power)
        return torch.stack([errors.sum(), torch.tensor(float(errors.numel()), dtype=torch.float64, device=output.device)])

    def value(self, state: Tensor) -> Tensor:
        return state[0] / state[1].clamp(min=1)


class R2Score(SumMetric):
    """The coefficient of determination per output column, averaged over the columns."""

    def __init__(self, num_outputs: int = 1):
        super().__init__(4 * num_outputs)  # per column: samples, sum y, sum y^2, squared error
        self.num_outputs = num_outputs

    def statistics(self, output: Tensor, targets: Tensor) -> Tensor:
        y, predicted = targets.double().reshape(len(targets), -1), output.double().reshape(len(targets), -1)
        if y.shape[1] != self.num_outputs:
            raise ConfigError(f"r2: targets have {y.shape[1]} columns, the task expects {self.num_outputs}")
        samples = torch.full((self.num_outputs,), float(len(y)), dtype=torch.float64, device=y.device)
        return torch.cat([samples, y.sum(0), (y * y).sum(0), ((y - predicted) ** 2).sum(0)])

    def value(self, state: Tensor) -> Tensor:
        n, total, squares, residual = state.view(4, self.num_outputs)
        spread = squares - total * total / n.clamp(min=1)
        return (1 - residual / spread).mean()


class Mean(SumMetric):
    """The mean of every value passed to ``update`` (``targets`` unused)."""

    def __init__(self):
        super().__init__(2)

    def update(self, values: Tensor, targets: Tensor | None = None) -> None:
        values = values.detach().double()
        self.state += torch.stack([values.sum(), torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)])

    def value(self, state: Tensor) -> Tensor:
        return state[0] / state[1].clamp(min=1)
