"""``task=auto``: classification or regression, whichever the data's target is.

The data decides, through the runtime values it offers every group: data that offers
``num_classes`` has class labels (``ClassificationTask``), data that does not has real-valued
targets (``RegressionTask``, one output per target column). Without a ``loss`` group
(``conf/task/auto.yaml`` removes it) the usual loss of that kind is used: cross-entropy or
MSE, summed over the batch as the loop expects. A loss named on the command line wins.

``AutoTask(...)`` returns an instance of one of those two classes, never an ``AutoTask``:
everything downstream (the dry forward's checks, the loop, checkpoints) sees the plain task.
It is a class, not a function, so a checkpoint's stored config may rebuild it without
``trust`` (only classes of trainkit's components are trusted by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from trainkit.tasks.supervised import ClassificationTask, Metrics, RegressionTask

DEFAULT_METRICS = {"classification": ("accuracy", "f1_macro"), "regression": ("mse", "r2")}


class AutoTask:
    """A factory: ``ClassificationTask`` when ``num_classes`` is given, else ``RegressionTask``.

    ``metrics`` null takes the usual ones of the chosen kind (accuracy and f1_macro, or mse and
    r2); a list is handed to the chosen task unchanged. ``loss_fn`` null picks
    ``CrossEntropyLoss`` or ``MSELoss`` with ``reduction="sum"``.
    """

    def __new__(cls, loss_fn: Callable | None = None, num_classes: int | None = None, out_features: int = 1,
                metrics: Metrics | None = None) -> Any:
        if num_classes is not None:
            loss = loss_fn if loss_fn is not None else nn.CrossEntropyLoss(reduction="sum")
            chosen = DEFAULT_METRICS["classification"] if metrics is None else metrics
            return ClassificationTask(loss, num_classes=num_classes, metrics=chosen)
        loss = loss_fn if loss_fn is not None else nn.MSELoss(reduction="sum")
        chosen = DEFAULT_METRICS["regression"] if metrics is None else metrics
        return RegressionTask(loss, metrics=chosen, out_features=out_features)
