"""What a run reports: events to its trackers (metrics.jsonl, TensorBoard, metrics.csv, MLflow;
``trainkit.core.trackers``), console lines or a bar.

Only the main rank writes; other ranks get a logger that does nothing. TensorBoard, MLflow and
tqdm are imported when first used, not at start-up.

In a terminal the bar keeps the bottom row: while it is shown, every logging handler that
writes to stdout or stderr writes through ``tqdm.write`` (the bar is cleared, the record
printed, the bar redrawn below it); files such as train.log are untouched. The bar never
writes hand-made escape codes and is cut to the terminal's width, so it never wraps.
Without a terminal there is no bar and no carriage return: plain log lines only.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from trainkit.core.trackers import CsvTracker, JsonlTracker, TensorBoardTracker, Tracker

log = logging.getLogger("trainkit")
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class RunLogger:
    """Hands every event to the run's trackers (``trainkit.core.trackers``) and shows progress.

    The trackers: metrics.jsonl always, TensorBoard (``tensorboard``) and metrics.csv (``csv``)
    in ``run_dir``, then ``trackers`` (an MLflow run). Ranks other than the main one
    (``enabled=False``) and a logger without ``run_dir`` write nothing.
    ``progress_bar=None`` shows a bar when stderr is a terminal and plain log lines every
    ``log_every_n_steps`` otherwise, so log files get no carriage-return spam.
    Used as a context manager, it closes the trackers (files complete) and then tells them how the
    run ended (``finish``: an MLflow run uploads its artifacts and status).
    """

    def __init__(self, run_dir: Path | None, enabled: bool = True, tensorboard: bool = True,
                 progress_bar: bool | None = None, csv: bool = False, trackers: Sequence[Tracker] = ()):
        self.run_dir = Path(run_dir) if run_dir is not None and enabled else None
        self.enabled = enabled
        self.started = time.monotonic()  # metrics.jsonl's time_s counts from here
        self.trackers: list[Tracker] = []
        if self.run_dir is not None:
            self.trackers = [JsonlTracker(self.run_dir, self.started), *([TensorBoardTracker(self.run_dir)] if tensorboard else []),
                             *([CsvTracker(self.run_dir)] if csv else []), *trackers]
        self.use_bar = enabled and (sys.stderr.isatty() if progress_bar is None else progress_bar)
        self._bar = None
        self._console = ExitStack()  # undoes the bar and the redirect of console logs

    # Trackers -----------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """One event, to every tracker (a metrics.jsonl line, TensorBoard scalars, ...)."""
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step, epoch)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_text(tag, text, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_hparams(hparams, metrics)

    def writer(self):
        """TensorBoard's SummaryWriter when TensorBoard is on (images, histograms), else None."""
        board = next((tracker for tracker in self.trackers if isinstance(tracker, TensorBoardTracker)), None)
        return board.writer() if board is not None else None

    def tracker_state(self) -> dict[str, Any]:
        """What checkpoints keep for the trackers (the MLflow run id)."""
        return {key: value for tracker in self.trackers for key, value in tracker.state().items()}

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, error_type: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        from trainkit.core.errors import Preempted

        status = "FINISHED" if error is None else "KILLED" if isinstance(error, (Preempted, KeyboardInterrupt)) else "FAILED"
        self.close()  # files complete before a tracker copies them (train.log, metrics.csv)
        for tracker in self.trackers:
            tracker.finish(status)

    # Console ------------------------------------------------------------------------------
    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        """A warning from any rank (other ranks print errors and warnings only)."""
        log.warning(message, *args)

    def start_progress(self, total: int, initial: int) -> None:
        """Show the bar (terminal only) and send console log records above it until ``close``."""
        if self.use_bar:
            from tqdm import tqdm

            self._bar = self._console.enter_context(tqdm(
                total=total, initial=initial, unit="step", mininterval=0.5, dynamic_ncols=True,
                file=sys.stderr, bar_format=BAR_FORMAT))
            self._console.enter_context(console_logs_above_bars())

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def step_line(self, metrics: dict[str, float], step: int, epoch: int, total: int) -> None:
        """A bar's postfix in a terminal (epoch, loss, lr, throughput), one plain line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(_postfix(metrics, epoch), refresh=False)
            return
        fields = "  ".join(f"{k.split('/', 1)[-1]} {_format(v)}" for k, v in metrics.items())
        log.info("epoch %d  step %d/%d  %s", epoch, step, total, fields)

    def validation(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        """One line per validation, ``validation  epoch 3  step 120  loss 0.2135  accuracy 0.951``:
        metric names without their ``val/`` prefix, the ``epoch_loss`` copy of the loss left out."""
        fields = "  ".join(f"{key.split('/', 1)[-1]} {_format(value)}" for key, value in metrics.items()
                           if key.split("/", 1)[-1] != "epoch_loss")
        self.info("validation  epoch %d  step %d  %s", epoch, step, fields)

    def summary(self, rows: dict[str, Any]) -> None:
        """The run's end in one record: in a terminal ``done`` and a two-column table, one row
        per key in the given order; otherwise one plain line ``done: key value; key value``.
        Floats are shown to 4 significant digits, anything else with ``str``."""
        values = {key: _format(value) if isinstance(value, float) else str(value) for key, value in rows.items()}
        if not self.use_bar:
            self.info("done: %s", "; ".join(f"{key} {value}" for key, value in values.items()))
            return
        width = max(map(len, values), default=0)
        self.info("done\n%s", "\n".join(f"  {key:<{width}}  {value}" for key, value in values.items()))

    def close(self) -> None:
        self._console.close()  # console handlers as before, then the bar's last state stays on its row
        self._bar = None
        for tracker in self.trackers:
            tracker.close()


def _format(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


@contextmanager
def console_logs_above_bars() -> Iterator[None]:
    """While inside, every logging handler (of any logger) whose stream is ``sys.stdout`` or
    ``sys.stderr`` writes through tqdm's ``DummyTqdmFile``, i.e. ``tqdm.write``: above the
    bars. Levels, filters and formatters stay; file handlers are not touched."""
    from tqdm.contrib import DummyTqdmFile

    loggers = [logging.root, *(named for named in logging.root.manager.loggerDict.values()
                               if isinstance(named, logging.Logger))]
    console = {id(handler): handler for logger in loggers for handler in logger.handlers
               if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
               and not isinstance(getattr(type(handler), "stream", None), property)}
    # (A handler whose stream is a read-only property, logging's own last-resort handler that dill
    # puts on its logger when torch imports it, cannot be redirected; it is left as it is.)
    streams = {handler: handler.setStream(DummyTqdmFile(handler.stream)) for handler in console.values()}
    try:
        yield
    finally:
        for handler, stream in streams.items():
            handler.setStream(stream)


def _postfix(metrics: dict[str, float], epoch: int) -> str:
    """``epoch 1  loss 0.412  lr 3e-4  28.5k samples/s``: what fits beside a bar."""
    from tqdm import tqdm

    fields = [f"epoch {epoch}"]
    if "train/loss" in metrics:
        fields.append(f"loss {_compact(metrics['train/loss'])}")
    if "train/learning_rate" in metrics:
        fields.append(f"lr {_compact(metrics['train/learning_rate'])}")
    fields += [f"{tqdm.format_sizeof(value, divisor=1000)} {key[len('train/'):-len('_per_second')]}/s"
               for key, value in metrics.items() if key.startswith("train/") and key.endswith("_per_second")]
    return "  ".join(fields)


def _compact(value: float) -> str:
    """3 significant digits, exponents without padding: 0.412, 2.3, 3e-4, 1.25e3."""
    if not math.isfinite(value) or value == 0 or 1e-2 <= abs(value) < 999.5:  # 999.5 would round to 1e+03
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
