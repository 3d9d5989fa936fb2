"""Callbacks the benchmarks plug into real runs (scripts/ is on PYTHONPATH for them)."""

from __future__ import annotations

import time
from pathlib import Path


class StampFirstStep:
    """Write the wall-clock time at the end of the first optimizer step to ``path``."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_step_end(self, trainer) -> None:
        if not self.path.exists():
            self.path.write_text(repr(time.time()))
