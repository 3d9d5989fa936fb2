"""trainkit: config-driven training for PyTorch models.

``import trainkit`` stays cheap: torch and the training loop load on first use of
``train_model``, ``Trainer`` or ``TrainResult``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainkit.__about__ import __version__

if TYPE_CHECKING:
    from trainkit.train import Trainer, TrainResult, train_model

__all__ = ["Trainer", "TrainResult", "__version__", "train_model"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainResult", "train_model"):
        from trainkit import train

        return getattr(train, name)
    raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
