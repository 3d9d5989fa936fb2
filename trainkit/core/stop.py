"""Stop requests: SIGTERM and SIGUSR1 ask a run to stop, at any moment of its life.

A signal only sets a flag (``STOP.requested``); the run looks at it at safe points (after
an optimizer step, between the phases of ``train_model``), writes what it must and ends
with exit code 75. ``trainkit train`` installs the handlers before it imports torch or
composes the config, so a signal during start-up is honoured too: the run then stops
before its first step, with nothing to save.

Never: do work inside a signal handler (it may interrupt a checkpoint write), or let a
handled request outlive the run it was meant for (``clear`` after stopping).
Nothing here imports torch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = tuple(name for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopRequest:
    """A flag that SIGTERM/SIGUSR1 set; a signal handler itself."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def __call__(self, signum: int, frame: Any = None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def clear(self) -> None:
        self.requested, self.signal_name = False, None


STOP = StopRequest()  # the process's one request: signals reach a process, not a trainer


def install() -> None:
    """Handle SIGTERM/SIGUSR1 with ``STOP`` from now on (main thread only; else a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            signal.signal(getattr(signal, name), STOP)


def ignore() -> None:
    """Ignore SIGTERM/SIGUSR1 from now on: a command whose work is done exits with its own code.
    (While Python shuts down it puts the default action back for any handler but "ignore",
    and a request that arrived then would kill a finished run with -15.)"""
    if threading.current_thread() is threading.main_thread():
        for name in SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """``STOP`` handles SIGTERM/SIGUSR1 inside the block; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {name: signal.getsignal(getattr(signal, name)) for name in SIGNALS}
    install()
    try:
        yield STOP
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
