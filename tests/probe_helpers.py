"""Callbacks that watch a run and keep what they saw: step counters with state of their own (kept
in checkpoints) and RNG records. Configs name them as ``probe_helpers.*`` (tests/ is on the path)."""

from __future__ import annotations

import hashlib
import os

import torch

from trainkit.callbacks import Callback


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
