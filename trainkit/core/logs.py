"""What a run reports: metrics.jsonl, TensorBoard scalars under tb/, console lines or a bar.

Only the main rank writes; other ranks get a logger that does nothing. TensorBoard is
imported when the first event is written, not at start-up.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("trainkit")


class RunLogger:
    """Writes events to ``run_dir`` (metrics.jsonl, tb/) and shows progress.

    ``progress_bar=None`` shows a bar when stderr is a terminal and plain log lines every
    ``log_every_n_steps`` otherwise, so log files get no carriage-return spam.
    """

    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = True,
                 progress_bar: bool | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None and enabled else None
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.use_bar = enabled and (sys.stderr.isatty() if progress_bar is None else progress_bar)
        self._writer = None
        self._jsonl = None
        self.started = time.monotonic()  # metrics.jsonl's time_s counts from here
        self._bar = None

    # Files --------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """One event: a metrics.jsonl line and a TensorBoard scalar per metric."""
        if self.run_dir is None:
            return
        if self._jsonl is None:
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        record = {"step": step, "epoch": epoch, "time_s": round(time.monotonic() - self.started, 3),
                  **{k: _finite_or_str(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        writer = self.writer()
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        writer = self.writer()
        if writer is not None:
            writer.add_text(tag, text, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        writer = self.writer()
        if writer is not None:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def writer(self):
        if self.run_dir is None or not self.tensorboard:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only when used

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        return self._writer

    # Console ------------------------------------------------------------------------------
    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        """A warning from any rank (other ranks print errors and warnings only)."""
        log.warning(message, *args)

    def start_progress(self, total: int, initial: int) -> None:
        if self.use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", mininterval=0.5,
                             dynamic_ncols=True, file=sys.stderr)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def step_line(self, metrics: dict[str, float], step: int, epoch: int, total: int) -> None:
        """A bar's postfix in a terminal, one plain line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(_short(metrics), refresh=False)
            return
        fields = "  ".join(f"{k.split('/', 1)[-1]} {_format(v)}" for k, v in metrics.items())
        log.info("epoch %d  step %d/%d  %s", epoch, step, total, fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _format(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _short(metrics: dict[str, float]) -> dict[str, str]:
    keep = ("train/loss", "train/learning_rate", "train/samples_per_second", "train/tokens_per_second")
    return {k.split("/", 1)[1]: _format(v) for k, v in metrics.items() if k in keep}
