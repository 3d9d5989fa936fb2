"""Callbacks that misbehave on purpose, for the distributed fault tests (on PYTHONPATH)."""

from __future__ import annotations

import hashlib
import os
import time

import torch

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


class RecordRngState(Callback):
    """Write a hash of torch's CPU RNG state after optimizer step ``step`` to
    ``folder/rank<r>`` (what that rank's next dropout masks are drawn from)."""

    def __init__(self, step: int, folder: str):
        self.step, self.folder = step, folder

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step == self.step:
            digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
            with open(os.path.join(self.folder, f"rank{trainer.dist.rank}"), "w") as file:
                file.write(digest)


class HangAtStep(Callback):
    """Hang for good on one rank after one step (a job stuck inside its step, deaf to stop
    requests), after writing ``stamp``."""

    def __init__(self, rank: int, step: int, stamp: str):
        self.rank, self.step, self.stamp = rank, step, stamp

    def on_step_end(self, trainer) -> None:
        if trainer.dist.rank == self.rank and trainer.state.global_step == self.step:
            with open(self.stamp, "w") as file:
                file.write(repr(time.time()))
            while True:
                time.sleep(1)
