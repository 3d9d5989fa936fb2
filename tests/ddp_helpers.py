"""Callbacks that misbehave on purpose, for the distributed fault tests (on PYTHONPATH)."""

from __future__ import annotations

import os
import time

from trainkit.callbacks import Callback


class RaiseOnRank(Callback):
    """Raise on one rank at one step (only on the first attempt of a torchrun job)."""

    def __init__(self, rank: int, step: int, hard: bool = False, stamp: str | None = None):
        self.rank, self.step, self.hard, self.stamp = rank, step, hard, stamp

    def on_step_end(self, trainer) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.dist.rank == self.rank and trainer.state.global_step == self.step:
            if self.stamp:
                with open(self.stamp, "w") as file:
                    file.write(repr(time.time()))
            if self.hard:
                os._exit(13)  # a dead worker, no clean-up
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")


class CountSteps(Callback):
    """A user callback with state of its own (kept in checkpoints)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, trainer) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
