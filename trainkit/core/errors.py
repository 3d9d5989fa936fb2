"""Errors a user can cause, and how they are told.

Every mistake in a config, a command line, a data file or a checkpoint becomes a
``ConfigError`` whose message names the key, file or line; the CLI prints it without a
traceback and exits with code 2. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75


class TrainkitError(Exception):
    """A problem trainkit can explain in one message; the CLI exits with ``exit_code``."""

    exit_code = EXIT_FAILED


class ConfigError(TrainkitError):
    """The config, the command line or an input file is wrong (exit code 2)."""

    exit_code = EXIT_USAGE


class ConfigErrors(ConfigError):
    """Several config problems found at once (``trainkit validate`` reports them all)."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(f"- {e}" for e in errors))


class TrainingFailed(TrainkitError):
    """Training could not go on (for example a non-finite loss under ``nan_policy=error``)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like ``name``, or None when nothing is close."""
    candidates = [str(c) for c in candidates]
    # A misremembered part of a longer name (patience -> early_stopping_patience) first.
    containing = sorted((c for c in candidates if name and name in c.split("_") + [c]), key=len)
    if containing:
        return containing[0]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """'; did you mean trainer.max_epochs?' or an empty string."""
    match = closest(name, candidates)
    return f"; did you mean {prefix}{match}?" if match else ""


class Preempted(TrainkitError):
    """Stopped on request (SIGTERM/SIGUSR1) after writing a resumable checkpoint."""

    exit_code = EXIT_PREEMPTED
