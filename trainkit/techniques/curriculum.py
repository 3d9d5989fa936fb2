"""Curriculum: schedule any numeric value of the live run over optimizer steps or epochs.

A ``Schedule`` is a callback (``callbacks: {NAME: {_target_: trainkit.techniques.curriculum.Schedule,
target: loss.label_smoothing, start_value: 0.0, end_value: 0.1}}``). Before every
optimizer step the value at ``target`` is set to a pure function of the step about to be
taken, so it saves nothing and a resumed run gets exactly the values of a run that never
stopped. The value in force is logged as ``curriculum/NAME`` every ``log_every_n_steps``.

``target`` is a dotted path on the trainer's live objects:

- ``task.<attr>...``: the task (``task.beta`` of ``task=vae``);
- ``loss.<attr>...``: the task's loss function, ``task.loss_fn`` (``loss.label_smoothing``
  of ``cross_entropy``, ``loss.beta`` of ``vae``, ``loss.alpha`` of a distillation loss,
  ``loss.terms.NAME.weight`` or ``loss.terms.NAME.loss.<attr>`` of ``composite``);
- ``model.<attr>...``: the model, not its DDP or compile wrapper (``model.blocks.0.2.p``: a
  dropout probability); parts are attributes, dict keys or list indices;
- ``optimizer.<key>``: that key of every parameter group (``optimizer.weight_decay``,
  ``optimizer.momentum``; ``optimizer.lr`` only with ``scheduler=none``, since a scheduler
  sets the learning rate itself).

The last part must already exist and hold a number (an ``int`` stays an ``int``, rounded).
``data.*`` cannot be scheduled: a data set's samples and batch plan are fixed when it is
built (the plan is a pure function of seed and epoch, which exact resume depends on), so a
curriculum on the NMT ``data.max_len`` would need the data to filter batches itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from trainkit.callbacks import Callback
from trainkit.core.errors import ConfigError, did_you_mean

SHAPES = ("linear", "cosine", "step")
UNITS = ("steps", "epochs")
ROOTS = ("task", "loss", "model", "optimizer")


def scheduled_value(position: float, start_value: float, end_value: float, start: float, end: float,
                    shape: str = "linear", jumps: int = 1) -> float:
    """The value at ``position``: ``start_value`` until ``start``, ``end_value`` from ``end``
    on, and in between ``linear``, ``cosine`` (half a cosine: flat at both ends) or ``step``
    (``jumps`` equal jumps, the last at ``end``)."""
    progress = min(1.0, max(0.0, (position - start) / (end - start)))
    if shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    elif shape == "step":
        progress = math.floor(progress * jumps) / jumps
    return start_value + (end_value - start_value) * progress


def child(node: Any, part: str, where: str) -> Any:
    """``node.part``, ``node[part]`` for a mapping, or ``node[int(part)]`` for a sequence."""
    if isinstance(node, Mapping) and part in node:
        return node[part]
    if part.lstrip("-").isdigit() and isinstance(node, (list, tuple)) and -len(node) <= int(part) < len(node):
        return node[int(part)]
    if not isinstance(node, Mapping) and hasattr(node, part):
        return getattr(node, part)
    if isinstance(node, Mapping):
        names = list(node)
    else:  # plain attributes and, for a module, its submodules
        names = [n for n in getattr(node, "__dict__", {}) if not n.startswith("_")]
        names += list(getattr(node, "_modules", {}))
    raise ConfigError(f"{where}: {type(node).__name__} has no {part!r}{did_you_mean(part, map(str, names))}")


class Schedule(Callback):
    """Set ``target`` from ``start_value`` to ``end_value`` between positions ``start`` and
    ``end`` (``over``: ``steps``, optimizer steps, or ``epochs``, whole epochs: the value
    changes only when an epoch begins). ``end: null`` is the end of training. ``name`` (the
    key under ``callbacks:``) names the logged value; ``steps_per_epoch`` and
    ``total_steps`` come from the run."""

    def __init__(self, target: str, start_value: float, end_value: float, start: int = 0,
                 end: int | None = None, shape: str = "linear", over: str = "steps", jumps: int = 1,
                 name: str | None = None, steps_per_epoch: int | None = None, total_steps: int | None = None):
        self.key = f"callbacks.{name}" if name else "curriculum"
        checks = [(shape in SHAPES, f"{self.key}.shape={shape!r}: choose one of {list(SHAPES)}"),
                  (over in UNITS, f"{self.key}.over={over!r}: choose one of {list(UNITS)}"),
                  (jumps >= 1, f"{self.key}.jumps={jumps}: must be at least 1"),
                  (start >= 0, f"{self.key}.start={start}: must be >= 0"),
                  (end is None or end > start, f"{self.key}.end={end}: must be after start={start}"),
                  (str(target).split(".")[0] in ROOTS and "." in str(target), self.target_hint(str(target)))]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.target, self.start_value, self.end_value = str(target), float(start_value), float(end_value)
        self.start, self.end, self.shape, self.over, self.jumps = start, end, shape, over, jumps
        self.name = name or self.target
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.value: float | None = None
        self.integer = False  # set from the target's current value at fit start

    def target_hint(self, target: str) -> str:
        if target.startswith("data."):
            return (f"{self.key}.target={target!r}: data values cannot be scheduled (a data set's samples and "
                    "batch plan are fixed when it is built); schedule task.*, loss.*, model.* or optimizer.*")
        root = target.split(".")[0]
        return (f"{self.key}.target={target!r}: must start with one of {', '.join(ROOTS)} and name an attribute "
                f"(loss.label_smoothing){did_you_mean(root, ROOTS)}")

    # The schedule ------------------------------------------------------------------------------
    def value_at(self, step: int) -> float:
        """The value for the optimizer step with index ``step`` (0-based)."""
        position = step if self.over == "steps" else step // self.steps_per_epoch
        value = scheduled_value(position, self.start_value, self.end_value, self.start, self.end,
                                self.shape, self.jumps)
        return round(value) if self.integer else value

    def on_fit_start(self, trainer: Any) -> None:
        if self.over == "epochs" and self.steps_per_epoch is None:
            if trainer.options.max_steps is not None:
                raise ConfigError(f"{self.key}: over=epochs needs steps_per_epoch (optimizer steps in one "
                                  "epoch) when trainer.max_steps is set")
            self.steps_per_epoch = max(1, trainer.total_steps // trainer.options.max_epochs)
        if self.end is None:
            total = self.total_steps or trainer.total_steps
            self.end = total if self.over == "steps" else math.ceil(total / self.steps_per_epoch)
            if self.end <= self.start:
                raise ConfigError(f"{self.key}.start={self.start}: the run ends at {self.over} {self.end}")
        self.setter, current = self.resolve(trainer)
        self.integer = isinstance(current, int)
        self.apply(trainer.state.global_step)

    def on_step_end(self, trainer: Any) -> None:
        step = trainer.state.global_step
        if step % trainer.options.log_every_n_steps == 0:
            trainer.logger.log_metrics({f"curriculum/{self.name}": self.value}, step, trainer.state.epoch)
        self.apply(step)

    def apply(self, step: int) -> None:
        self.value = self.value_at(step)
        self.setter(self.value)

    # The target --------------------------------------------------------------------------------
    def resolve(self, trainer: Any) -> tuple[Callable[[float], None], Any]:
        """(a function that sets the target, its current value), or a ConfigError naming the part."""
        where = f"{self.key}.target={self.target!r}"
        root, *parts = self.target.split(".")
        if root == "optimizer":
            groups = trainer.optimizer.param_groups
            keys = [k for k in groups[0] if k != "params"]
            if len(parts) != 1 or parts[0] not in keys:
                raise ConfigError(f"{where}: the optimizer's parameter groups have the keys {keys}"
                                  f"{did_you_mean(parts[-1] if parts else '', keys, 'optimizer.')}")

            def set_groups(value: float) -> None:
                for group in groups:
                    group[parts[0]] = value

            return set_groups, groups[0][parts[0]]
        node = {"task": trainer.task, "loss": getattr(trainer.task, "loss_fn", None), "model": trainer.model}[root]
        if node is None:
            raise ConfigError(f"{where}: the task ({type(trainer.task).__name__}) has no loss function (loss_fn)")
        for part in parts[:-1]:
            node = child(node, part, where)
        current = child(node, parts[-1], where)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            raise ConfigError(f"{where}: holds {type(current).__name__} {current!r}, not a number")
        last = parts[-1]
        if isinstance(node, Mapping):
            return (lambda value: node.__setitem__(last, value)), current
        if isinstance(node, list):
            return (lambda value: node.__setitem__(int(last), value)), current
        return (lambda value: setattr(node, last, value)), current
