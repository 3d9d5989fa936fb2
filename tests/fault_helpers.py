"""Models and callbacks that fail on purpose, for the reliability tests (on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import torch

from trainkit.callbacks import Callback
from trainkit.models import MLP


class SignalAtStep(Callback):
    """Send a signal to this very process after optimizer step ``step``."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", rank: int | None = None):
        self.step, self.signal, self.rank = step, getattr(signal, signal_name), rank

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step == self.step and self.rank in (None, trainer.dist.rank):
            os.kill(os.getpid(), self.signal)


class KillDuringSave(Callback):
    """SIGKILL this process halfway through writing the checkpoint after step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step != self.step:
            return
        import trainkit.core.checkpoint

        real_save = torch.save

        def half_save(state, file, *args, **kwargs):
            real_save(state, file, *args, **kwargs)
            file.flush()
            file.truncate(file.tell() // 2)  # a half-written file on disk
            os.fsync(file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        trainkit.core.checkpoint.torch.save = half_save  # type: ignore[attr-defined]


class NanAtCall(MLP):
    """An MLP whose training forward returns NaN on its ``nan_call``-th training call."""

    def __init__(self, in_features: int, out_features: int, nan_call: int = 5, hidden_sizes=(256, 128),
                 dropout: float = 0.0, activation: str = "relu", gradient_checkpointing: bool = False):
        super().__init__(in_features, out_features, hidden_sizes, dropout, activation, gradient_checkpointing)
        self.nan_call, self.calls = nan_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.nan_call:
                return out * float("nan")
        return out
