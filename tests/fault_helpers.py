"""Models and callbacks that fail on purpose: signals at a step or a phase of the run, a kill
halfway through a checkpoint write, a NaN loss, a rank that raises or hangs. Configs name them as
``fault_helpers.*`` (tests/ is on the path, in-process and in the ``cli`` fixture's subprocesses)."""

from __future__ import annotations

import os
import signal
import time

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


class SignalAtPhase(Callback):
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
