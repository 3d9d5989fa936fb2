"""Where a run is: the counters the loop, the checkpoint manager and the validation monitor
share, saved in every checkpoint as ``trainer_state``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainerState:
    """Where the run is: enough, with the batch plan, to continue at the same sample."""

    epoch: int = 0
    global_step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # micro-batches of this rank already consumed in ``epoch``
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    top_k: list = field(default_factory=list)  # [[metric, file name], ...] best first
    stop_reason: str | None = None
    world_size: int = 1  # processes that wrote this state (batch_in_epoch counts per rank)
    skipped_steps: int = 0  # updates dropped under nan_policy=skip
    consecutive_skips: int = 0
    lineage: str = ""  # one id for a run and every resumed continuation of it: best.pt must carry ours

    def reached(self, max_steps: int | None, max_epochs: int) -> bool:
        """Whether training is done: ``max_steps`` optimizer steps when set, else ``max_epochs``."""
        return self.global_step >= max_steps if max_steps else self.epoch >= max_epochs
