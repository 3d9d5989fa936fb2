"""What a run shows in a terminal: log lines above a bar that stays on its own bottom row.

The CLI test runs `trainkit train` on a pseudo-terminal of 160x40 and replays everything it
wrote through a small terminal model (carriage return, line feed, the cursor and erase codes
tqdm emits; no wrapping, so a bar wider than the terminal shows up as a long row). The unit
tests check the validation line and the summary table with and without a terminal.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from trainkit.core.logs import RunLogger

COLUMNS, ROWS = 160, 40
BAR = re.compile(r"[▏▎▍▌▋▊▉█]|\b\d+/40\b")  # tqdm's blocks or its "n/total" counter (max_steps=40)
LOG = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[")  # the start of a log record: [2026-12-01 10:00:00,123][
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def run_in_terminal(args: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """Run ``python -m trainkit ARGS`` with stdin, stdout and stderr on a 160x40 pseudo-terminal;
    returns its exit code and everything it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("COLUMNS", "LINES", "HYDRA_FULL_ERROR"):  # the size must come from the terminal
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, "-m", "trainkit", *args], cwd=cwd, env=env,
                               stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                process.kill()
                pytest.fail(f"no end after {timeout} s; output so far:\n{b''.join(chunks).decode(errors='replace')}")
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def screen_rows(output: str) -> list[str]:
    """The rows a terminal would show for ``output``, with unlimited width (no wrapping):
    ``\\r`` to column 0, ``\\n`` one row down, CSI cursor moves and erases; colours ignored."""
    rows: list[list[str]] = [[]]
    row = column = 0
    for token in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\r|\n|\x08)", output):
        if not token:
            continue
        while len(rows) <= row:
            rows.append([])
        if token == "\r":
            column = 0
        elif token == "\n":
            row += 1
        elif token == "\x08":
            column = max(0, column - 1)
        elif token.startswith("\x1b["):
            row, column = _control(CSI.fullmatch(token), rows, row, column)
        else:
            line = rows[row]
            line.extend(" " * (column + len(token) - len(line)))
            line[column:column + len(token)] = token
            column += len(token)
    return ["".join(line) for line in rows]


def _control(code: re.Match, rows: list[list[str]], row: int, column: int) -> tuple[int, int]:
    argument, command = code.group(1), code.group(2)
    count = int(argument) if argument.isdigit() else 1
    if command == "A":
        return max(0, row - count), column
    if command == "B":
        return row + count, column
    if command == "C":
        return row, column + count
    if command == "D":
        return row, max(0, column - count)
    if command == "G":
        return row, count - 1
    if command == "K":
        line = rows[row] if row < len(rows) else []
        if argument in ("", "0"):
            del line[column:]
        elif argument == "1":
            line[:column + 1] = " " * min(len(line), column + 1)
        else:
            line.clear()
        return row, column
    if command == "m":
        return row, column
    raise AssertionError(f"the terminal model does not know the control code {code.group(0)!r}")


def test_screen_rows_models_a_terminal():
    assert screen_rows("abc\rX\r\nc\x1b[Ad\x1b[K\r\n\r\n\x1b[2Ke") == ["Xd", "c", "e"]
    assert screen_rows("a\nb") == ["a", " b"]  # a line feed alone keeps the column
    assert screen_rows("12345\r\x1b[1G\x1b[2C\x1b[K!") == ["12!"]


@pytest.mark.slow
def test_a_terminal_shows_log_lines_above_a_bar_that_fits(tmp_path):
    run = tmp_path / "run"
    code, output = run_in_terminal(["train", "+experiment=digits_mlp", "trainer.max_steps=40",
                                    "trainer.log_every_n_steps=5", "trainer.eval_every_n_steps=10",
                                    "logging.tensorboard=false",
                                    f"hydra.run.dir={run}"], cwd=tmp_path)
    rows = screen_rows(output)
    shown = "\n".join(f"{i:3d}|{r}" for i, r in enumerate(rows))
    assert code == 0, shown
    bar_rows = [i for i, r in enumerate(rows) if BAR.search(r)]
    assert bar_rows, f"no progress bar on a terminal:\n{shown}"
    mixed = [i for i in bar_rows if LOG.search(rows[i]) or "validation" in rows[i]]
    assert not mixed, f"rows {mixed} hold the bar and a log line:\n{shown}"
    too_long = [i for i in bar_rows if len(rows[i]) > COLUMNS]  # a log line may wrap: it is above the bar
    assert not too_long, f"bar rows {too_long} are longer than the terminal's {COLUMNS} columns:\n{shown}"

    evaluations = sum("val/loss" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    validation_rows = [i for i, r in enumerate(rows) if "validation" in r]
    assert len(validation_rows) == evaluations == 4, shown
    for i in validation_rows:  # one record, alone on its row, not overwritten by the bar
        assert LOG.match(rows[i]) and len(LOG.findall(rows[i])) == 1, f"row {i}:\n{shown}"
    assert max(bar_rows) > max(validation_rows), f"the bar is not below the log lines:\n{shown}"
    final_bar = rows[max(bar_rows)]
    assert "40/40" in final_bar and all(word in final_bar for word in ("loss ", "lr ")), final_bar
    assert final_bar.rstrip().endswith("samples/s]"), f"the postfix is cut: {final_bar}"


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger="trainkit")
    return caplog


METRICS = {"val/loss": 0.21345, "val/accuracy": 0.95104, "val/epoch_loss": 0.21345}
SUMMARY = {"best val/accuracy": 0.95104, "test/accuracy": 0.948, "steps": 120, "epochs": 3,
           "wall time": "12.3 s", "result": Path("outputs/run/result.json")}


@pytest.mark.parametrize("terminal", [False, True])
def test_one_compact_validation_line(records, terminal):
    RunLogger(None, tensorboard=False, progress_bar=terminal).validation(METRICS, step=120, epoch=3)
    assert records.messages == ["validation  epoch 3  step 120  loss 0.2135  accuracy 0.951"]


def test_the_summary_is_an_aligned_table_in_a_terminal(records):
    RunLogger(None, tensorboard=False, progress_bar=True).summary(SUMMARY)
    assert records.messages == ["done\n"
                                "  best val/accuracy  0.951\n"
                                "  test/accuracy      0.948\n"
                                "  steps              120\n"
                                "  epochs             3\n"
                                "  wall time          12.3 s\n"
                                "  result             outputs/run/result.json"]


def test_the_summary_is_one_plain_line_without_a_terminal(records):
    RunLogger(None, tensorboard=False, progress_bar=False).summary(SUMMARY)
    assert records.messages == ["done: best val/accuracy 0.951; test/accuracy 0.948; steps 120; epochs 3; "
                                "wall time 12.3 s; result outputs/run/result.json"]
