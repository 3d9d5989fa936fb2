"""What a run reports: metrics.jsonl, TensorBoard scalars under tb/, console lines or a bar.

Only the main rank writes; other ranks get a logger that does nothing. TensorBoard and tqdm
are imported when first used, not at start-up.

In a terminal the bar keeps the bottom row: while it is shown, every logging handler that
writes to stdout or stderr writes through ``tqdm.write`` (the bar is cleared, the record
printed, the bar redrawn below it); files such as train.log are untouched. The bar never
writes hand-made escape codes and is cut to the terminal's width, so it never wraps.
Without a terminal there is no bar and no carriage return: plain log lines only.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("trainkit")
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


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
        self._console = ExitStack()  # undoes the bar and the redirect of console logs

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
