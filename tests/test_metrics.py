"""trainkit.metrics against torchmetrics (a test-only dependency), batch by batch, and the
sums that make them exact across ranks."""

from __future__ import annotations

import pytest
import torch
import torchmetrics  # in .[dev]: a missing install fails here instead of skipping

from trainkit import metrics


def batches(seed: int, classes: int = 7, outputs: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    for size in (13, 1, 40, 8):
        if outputs is None:
            yield torch.randn(size, classes, generator=generator), torch.randint(0, classes, (size,), generator=generator)
        else:
            targets = torch.randn(size, outputs, generator=generator)
            yield targets + 0.5 * torch.randn(size, outputs, generator=generator), targets


@pytest.mark.parametrize("ours, theirs", [
    (lambda: metrics.Accuracy(), lambda: torchmetrics.Accuracy(task="multiclass", num_classes=7)),
    (lambda: metrics.Accuracy(top_k=5), lambda: torchmetrics.Accuracy(task="multiclass", num_classes=7, top_k=5)),
    (lambda: metrics.MacroF1(7), lambda: torchmetrics.F1Score(task="multiclass", num_classes=7, average="macro")),
])
def test_classification_metrics_match_torchmetrics(ours, theirs):
    for seed in range(3):
        a, b = ours(), theirs()
        for output, targets in batches(seed):
            a.update(output, targets)
            b.update(output, targets)
        assert a.compute() == pytest.approx(float(b.compute()), abs=1e-6)


def test_macro_f1_skips_classes_never_seen():
    f1 = metrics.MacroF1(4)
    f1.update(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 5.0, 0, 0]]), torch.tensor([0, 1, 0]))
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; classes 2 and 3 never occur
    assert f1.compute() == pytest.approx(2 / 3)


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("ours, theirs", [
    (lambda n: metrics.MeanError(power=2), lambda n: torchmetrics.MeanSquaredError()),
    (lambda n: metrics.MeanError(power=1), lambda n: torchmetrics.MeanAbsoluteError()),
    (lambda n: metrics.R2Score(n), lambda n: torchmetrics.R2Score(multioutput="uniform_average")),
])
def test_regression_metrics_match_torchmetrics(ours, theirs, outputs):
    a, b = ours(outputs), theirs(outputs)
    for output, targets in batches(0, outputs=outputs):
        if outputs == 1:
            output, targets = output.squeeze(-1), targets.squeeze(-1)
        a.update(output, targets)
        b.update(output, targets)
    assert a.compute() == pytest.approx(float(b.compute()), rel=1e-6)


def test_sums_of_shards_equal_the_whole():
    """What an all-reduce does: the state of two shards added equals one pass over all."""
    whole, first, second = (metrics.MacroF1(7) for _ in range(3))
    data = list(batches(1))
    for index, (output, targets) in enumerate(data):
        whole.update(output, targets)
        (first if index % 2 else second).update(output, targets)
    merged = metrics.MacroF1(7)
    merged.state = first.state + second.state
    assert merged.compute() == whole.compute()
    mean = metrics.Mean()
    mean.update(torch.tensor([1.0, 2.0]))
    mean.update(torch.tensor([6.0]))
    assert mean.compute() == 3.0
