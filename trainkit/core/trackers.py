"""Where a run's metrics go: one object per destination, built once, each told the same events.

``RunLogger`` (``trainkit.core.logs``) holds a list of trackers and hands every event to each;
the training loop only talks to the logger and never knows which trackers are on. A tracker
may implement any of:

- ``log_metrics(metrics, step, epoch)``: one logged event (train metrics at the log interval,
  an epoch's loss, a validation, the test metrics);
- ``log_text(tag, text, step)`` and ``log_hparams(hparams, metrics)`` (TensorBoard's extras);
- ``state()``: plain values a checkpoint keeps for it (the MLflow run id, so a resumed run
  continues the same MLflow run);
- ``finish(status)``: the run ended (``FINISHED``, ``FAILED`` or ``KILLED`` when preempted);
- ``close()``: release files; it may be called more than once.

The built-in ones: ``JsonlTracker`` (metrics.jsonl, always on), ``TensorBoardTracker`` (tb/),
``CsvTracker`` (metrics.csv) and ``MlflowTracker`` (``trainkit.core.mlflow_tracker``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any


class Tracker:
    """The events a tracker may receive; each one does nothing unless overridden."""

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...

    def state(self) -> dict[str, Any]:
        return {}

    def finish(self, status: str) -> None: ...

    def close(self) -> None: ...


class JsonlTracker(Tracker):
    """``metrics.jsonl``: one JSON object per event (``step``, ``epoch``, ``time_s`` and the
    metrics; a non-finite value as its string), flushed at once, appended to on reopen."""

    def __init__(self, run_dir: Path, started: float):
        self.path, self.started = Path(run_dir) / "metrics.jsonl", started
        self._file = None

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        record = {"step": step, "epoch": epoch, "time_s": round(time.monotonic() - self.started, 3),
                  **{key: finite_or_str(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardTracker(Tracker):
    """``tb/``: a scalar per metric, text and hyperparameters; TensorBoard is imported on first use."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / "tb"
        self._writer = None

    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only when used

            self._writer = SummaryWriter(log_dir=str(self.folder))
        return self._writer

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        writer = self.writer()
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer().add_text(tag, text, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer().add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class CsvTracker(Tracker):
    """``metrics.csv``: one row per logged step (events of one step, such as the train metrics
    and the validation after them, share a row; ``epoch`` is the step's latest), one column per
    metric, empty where a step did not log it. Readable by ``pandas.read_csv``.

    A row is written when the next step's first event arrives and at ``close``. Columns appear
    as metrics do (validation after the first epoch, test at the end): the file is then
    rewritten once with the wider header, atomically; otherwise rows are appended."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = ["step", "epoch"]
        self.rows: list[dict[str, Any]] = []  # every written row (rewrites need them)
        self.pending: dict[str, Any] | None = None  # the current step's row
        self.written_columns: list[str] = []
        if self.path.exists():  # a run continued in its own directory (a sweep job resumed) adds rows
            self.read_existing()

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self.pending is not None and self.pending["step"] != step:
            self.write_pending()
        if self.pending is None:
            self.pending = {"step": step}
        self.pending.update(metrics, epoch=epoch)
        self.columns += [key for key in metrics if key not in self.columns]

    def read_existing(self) -> None:
        try:
            with open(self.path, encoding="utf-8", newline="") as file:
                reader = csv.DictReader(file)
                rows, columns = list(reader), list(reader.fieldnames or [])
        except (OSError, UnicodeDecodeError, csv.Error):
            rows, columns = [], []
        if columns[:2] != ["step", "epoch"] or any(None in row for row in rows):  # not ours: keep it aside
            os.replace(self.path, self.path.with_name(self.path.name + ".unreadable"))
            return
        self.rows, self.columns, self.written_columns = rows, columns, list(columns)

    def write_pending(self) -> None:
        row, self.pending = self.pending, None
        if row is None:
            return
        self.rows.append(row)
        if self.columns != self.written_columns:
            self.rewrite()
            return
        with open(self.path, "a", encoding="utf-8", newline="") as file:
            csv.DictWriter(file, self.columns).writerow(row)

    def rewrite(self) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temporary, "w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(temporary, self.path)
        self.written_columns = list(self.columns)

    def close(self) -> None:
        self.write_pending()


def finite_or_str(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)
