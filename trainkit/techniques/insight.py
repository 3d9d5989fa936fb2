"""Looking inside a run: torch.profiler traces and per-layer weight/gradient statistics.

Both are objects built before the loop; when switched off they do nothing, so the loop
text is the same either way and pays one method call per step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("trainkit")


class Profiler:
    """``trainer.profile=true``: skip ``wait`` steps, warm up ``warmup``, record ``active``;
    the trace goes to ``<run dir>/profile/`` (TensorBoard's profiler plugin or Perfetto)
    and the top operators by self time are printed when recording ends."""

    def __init__(self, enabled: bool, run_dir: Path | None, wait: int = 5, warmup: int = 2, active: int = 5):
        self.profile = None
        if not enabled:
            return
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        folder = str((run_dir or Path("outputs")) / "profile")
        self.profile = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                               on_trace_ready=self.report(tensorboard_trace_handler(folder)), record_shapes=True)
        self.folder = folder
        self.profile.start()

    def report(self, save: Any) -> Any:
        def ready(profile: Any) -> None:
            save(profile)
            table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            log.info("profiler trace written to %s; top operators by self time:\n%s", self.folder, table)

        return ready

    def step(self) -> None:
        if self.profile is not None:
            self.profile.step()

    def stop(self) -> None:
        if self.profile is not None:
            self.profile.stop()
            self.profile = None


class LayerStats:
    """``logging.histograms_every_n_steps=N``: every N steps, a histogram and the norm of
    each parameter's weights and gradients in TensorBoard (``weights/<name>``,
    ``grads/<name>``, ``weight_norm/<name>``, ``grad_norm/<name>``)."""

    def __init__(self, every_n_steps: int | None, logger: Any):
        self.every, self.logger = every_n_steps, logger

    def maybe_log(self, model: nn.Module, step: int) -> None:
        """Call after backward, before the gradients are cleared; ``step`` is 1-based."""
        if not self.every or step % self.every:
            return
        writer = self.logger.writer()
        if writer is None:
            return
        for name, parameter in model.named_parameters():
            weights = parameter.detach().float().cpu()
            writer.add_histogram(f"weights/{name}", weights, step)
            writer.add_scalar(f"weight_norm/{name}", float(weights.norm()), step)
            if parameter.grad is not None:
                grads = parameter.grad.detach().float().cpu()
                writer.add_histogram(f"grads/{name}", grads, step)
                writer.add_scalar(f"grad_norm/{name}", float(grads.norm()), step)
