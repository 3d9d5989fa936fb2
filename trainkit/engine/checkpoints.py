"""The checkpoint manager: which files a run writes (last.pt, best.pt, top-k), resuming
from one, the run directory's lineage and every callback's state. The file format itself
(atomic writes, checksums, safe loading) is ``trainkit.core.checkpoint``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trainkit.core import checkpoint
from trainkit.core.errors import ConfigError
from trainkit.engine.state import TrainerState

log = logging.getLogger("trainkit")


def read_verified(path: Path) -> dict[str, Any] | None:
    """A checkpoint that passes its checks, or None (warned) when it does not."""
    try:
        return checkpoint.load(path)
    except ConfigError as error:
        log.warning("%s; not used as this run's best checkpoint", error)
        return None


def check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: Any, path: Any) -> None:
    """A checkpoint's optimizer state must be of the configured optimizer: the same settings
    in every parameter group (torch would load Adam's groups into SGD and fail at the step)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    not_settings = {"params", "initial_lr"}  # initial_lr belongs to the scheduler
    ours = [set(group) - not_settings for group in optimizer.state_dict()["param_groups"]]
    theirs = [set(group) - not_settings for group in groups if isinstance(group, dict)] if isinstance(groups, list) else []
    if theirs != ours:
        differ = sorted(set().union(*theirs, *ours) - (set.intersection(*theirs, *ours) if theirs and ours else set()))
        raise ConfigError(f"{path}: its optimizer state is not of the configured {type(optimizer).__name__} "
                          f"({len(theirs)} vs {len(ours)} parameter groups; settings that differ: "
                          f"{', '.join(differ) or 'none'}); resume with the optimizer it was trained with, or "
                          "start from its weights only with init_from=...")


def top_k_name(step: int) -> str:
    return f"top-step{step:08d}.pt"


def trainer_state_from(saved: Any, path: Any) -> TrainerState:
    """A checkpoint's trainer_state, checked: unknown keys are ignored, wrong types refused."""
    known = TrainerState.__dataclass_fields__
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in ("epoch", "global_step")):
        raise ConfigError(f"checkpoint {path}: its trainer_state is not a trainkit trainer state")
    return TrainerState(**{key: value for key, value in saved.items() if key in known})


def callback_names(callbacks: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """Callbacks by name: a mapping as given; a sequence by class name, numbered when repeated."""
    if isinstance(callbacks, Mapping):
        return dict(callbacks)
    classes = [type(callback).__name__ for callback in callbacks]
    return {(name if classes.count(name) == 1 else f"{name}.{classes[:index].count(name)}"): callback
            for index, (name, callback) in enumerate(zip(classes, callbacks))}
