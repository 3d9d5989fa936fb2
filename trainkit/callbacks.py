"""The callback interface: a handful of hooks for code that must run inside the loop.

A callback is any object with some of these methods; ``Callback`` gives no-op defaults.
Callbacks are listed under ``callbacks:`` in the config (name -> ``_target_``), and what
``state_dict`` returns is saved in checkpoints under that name and handed back to
``load_state_dict`` on resume.
"""

from __future__ import annotations

from typing import Any


class Callback:
    def on_fit_start(self, trainer: Any) -> None:
        """Before the first step (also after a resume)."""

    def on_step_end(self, trainer: Any) -> None:
        """After every optimizer step; ``trainer.state.global_step`` is already counted."""

    def on_evaluate_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        """After every validation pass, with its metrics."""

    def on_fit_end(self, trainer: Any) -> None:
        """After the last step, before testing."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, numbers, strings, containers) to keep in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


class StopAt(Callback):
    """Stop with a resumable checkpoint (exit 75, like SIGTERM) after ``step`` optimizer steps
    or ``minutes`` of wall time: fits a run into a job's time limit.

    ``callbacks: {stop: {_target_: trainkit.callbacks.StopAt, minutes: 230}}``
    """

    def __init__(self, step: int | None = None, minutes: float | None = None):
        import time

        self.step, self.minutes = step, minutes
        self.deadline = time.monotonic() + 60 * minutes if minutes is not None else None

    def on_step_end(self, trainer: Any) -> None:
        import time

        reached = self.step is not None and trainer.state.global_step >= self.step
        if reached or (self.deadline is not None and time.monotonic() >= self.deadline):
            trainer.request_stop()
