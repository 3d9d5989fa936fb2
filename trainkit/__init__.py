"""trainkit: config-driven training for PyTorch models.

``import trainkit`` stays cheap: torch and the training loop load on first use of
``train_model``, ``Trainer`` or ``TrainResult``.

The package is layered, bottom to top (``docs/architecture.md``; checked by import-linter):
``core`` (errors, config schema, builder, checkpoint files, logging, precision, ranks),
the components a config names (``models``, ``data``, ``tasks``, ``losses``, ``metrics``,
``schedulers``, ``callbacks``), ``techniques`` (LoRA, distillation, curriculum, profiling),
``engine`` (the loop, checkpoint manager, validation monitor, launcher), ``run``
(``train_model``), ``commands`` and ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainkit.__about__ import __version__

if TYPE_CHECKING:
    from trainkit.engine.loop import Trainer
    from trainkit.run.train import TrainResult, train_model

__all__ = ["Trainer", "TrainResult", "__version__", "train_model"]

PUBLIC = {"Trainer": "trainkit.engine.loop", "TrainResult": "trainkit.run.train", "train_model": "trainkit.run.train"}
# Modules whose config paths predate the layered package: ``_target_: trainkit.distill.X``
# (in presets, user configs and the configs stored in older checkpoints) still resolves.
MOVED = {"distill": "trainkit.techniques.distill", "curriculum": "trainkit.techniques.curriculum"}


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(PUBLIC[name]), name)
    if name in MOVED:
        return importlib.import_module(MOVED[name])
    raise AttributeError(f"module 'trainkit' has no attribute {name!r}")
