"""Callbacks for the review-fix tests (on PYTHONPATH through tests/)."""

from __future__ import annotations

import os
import signal

from trainkit.callbacks import Callback


class EveryNth(Callback):
    """Counts the optimizer steps divisible by ``every``: two of them hold different states."""

    def __init__(self, every: int):
        self.every, self.count = every, 0

    def on_step_end(self, trainer) -> None:
        self.count += trainer.state.global_step % self.every == 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class SignalAt(Callback):
    """SIGTERM to this process at a phase of the run: ``final_eval`` (inside the last
    validation) or ``fit_end`` (after fit, before the test pass)."""

    def __init__(self, phase: str, step: int):
        self.phase, self.step = phase, step

    def on_evaluate_end(self, trainer, metrics) -> None:
        if self.phase == "final_eval" and trainer.state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer) -> None:
        if self.phase == "fit_end":
            os.kill(os.getpid(), signal.SIGTERM)
