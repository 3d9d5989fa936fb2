"""Evaluation metrics, exact across ranks: trainkit's own, kept as sums, and any torchmetrics
metric named by ``_target_``.

Each of trainkit's own metrics holds a float64 vector of sufficient statistics (correct and
total counts, per-class true/false positives, sums of errors and squares), adds each batch's
statistics on the device, and turns the sums into a value once at ``compute()``. Under
torch.distributed the sums of every rank are added first: the result equals one process
evaluating every sample, never a mean of per-rank means. They serve the short names
(``accuracy``, ``f1_macro``, ``mse``, ...) because importing torchmetrics costs about 1.3 s
(scipy and matplotlib come with it; BENCHMARKS.md "Start-up").

``build_metric`` turns a ``_target_`` node into a metric at the first evaluation that uses
it, so torchmetrics is never imported at start-up. It accepts only metrics that are exact
across ranks: a ``torchmetrics.Metric`` (its ``compute()`` gathers or sums the states of every
rank) or one of the classes here.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.core.ranks import sum_over_ranks

# What ``torchmetrics.Metric.__init__`` takes through the ``**kwargs`` of every metric class
# (torchmetrics 1.x); a metric's own arguments come from its signature.
TORCHMETRICS_KWARGS = ("compute_on_cpu", "dist_sync_on_step", "process_group", "dist_sync_fn",
                       "distributed_available_fn", "sync_on_compute", "compute_with_cache")


class SumMetric:
    """A metric whose state is a vector of ``size`` sums."""

    def __init__(self, size: int):
        self.state = torch.zeros(size, dtype=torch.float64)

    def to(self, device: torch.device | str) -> SumMetric:
        self.state = self.state.to(device)
        return self

    def reset(self) -> None:
        self.state.zero_()

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


def torchmetrics_metric(obj: Any) -> bool:
    """Whether ``obj`` is a ``torchmetrics.Metric`` class or instance; never imports torchmetrics
    (an object of it exists only once it has been imported)."""
    module = sys.modules.get("torchmetrics")
    if module is None:
        return False
    return issubclass(obj, module.Metric) if isinstance(obj, type) else isinstance(obj, module.Metric)


def build_metric(node: Mapping[str, Any], path: str, runtime: Mapping[str, Any]) -> Any:
    """The metric a ``_target_`` node names (importing its module, e.g. torchmetrics, now),
    built by ``trainkit.core.builder.instantiate``: ``runtime`` values (``num_classes``, ...) fill
    the arguments the target names and the node leaves out. An unknown key is a ConfigError
    naming the closest argument, also for torchmetrics classes (whose ``**kwargs`` go to
    ``Metric``). Only a ``torchmetrics.Metric`` or a ``SumMetric`` is accepted, with
    ``sync_on_compute`` left on: anything else would report one rank's shard under DDP."""
    from omegaconf import OmegaConf

    from trainkit.core.builder import HYDRA_KEYS, accepted, instantiate, resolve_target

    config = OmegaConf.create(dict(node))
    target = resolve_target(config, path)
    params, _ = accepted(target)
    if torchmetrics_metric(target):
        known = [*params, *TORCHMETRICS_KWARGS]
        for key in config:
            if key not in HYDRA_KEYS and key not in known:
                raise ConfigError(f"{path}.{key}: not an argument of {config._target_}"
                                  f"{did_you_mean(str(key), known, f'{path}.')}")
    metric = instantiate(config, path, {key: value for key, value in runtime.items() if key in params})
    if not (isinstance(metric, SumMetric) or torchmetrics_metric(metric)):
        raise ConfigError(f"{path}: {config._target_} gave a {type(metric).__name__}, not a torchmetrics.Metric; "
                          "only those (and trainkit.metrics classes) are exact across ranks")
    if getattr(metric, "sync_on_compute", True) is False:
        raise ConfigError(f"{path}.sync_on_compute=false: under DDP each rank would report only its own "
                          f"shard; remove the key (~{path}.sync_on_compute)")
    return metric


def metric_value(metric: Any, path: str) -> float:
    """``metric.compute()`` as one float (under DDP every rank must call it: it syncs)."""
    value = metric.compute()
    if (isinstance(value, Tensor) and value.numel() == 1) or isinstance(value, (int, float)):
        return float(value)
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise ConfigError(f"{path}: compute() gave {shape}, not one number; choose arguments that reduce it "
                      "to one (for example average: macro)")
