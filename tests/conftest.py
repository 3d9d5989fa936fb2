"""Shared fixtures: compose configs the way `trainkit train` does, run the command line the way a
user types it, and compare trained weights.

Every subprocess a test starts gets ``subprocess_env()``: one torch thread, ``tests/`` on
``PYTHONPATH`` (so configs can name ``fault_helpers.*`` and ``probe_helpers.*`` targets), and none
of the caller's ``HYDRA_FULL_ERROR``, ``WORLD_SIZE``, ``RANK``, ``COLUMNS`` or ``LINES``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two cores: keep each test process to one
os.environ.setdefault("TRAINKIT_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "trainkit"))

TESTS = Path(__file__).parent
PYTHON = (sys.executable,)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
# From a developer's shell or a torchrun around pytest; the output width comes from the
# subprocess's own terminal (or none), not from the shell's COLUMNS and LINES.
NOT_INHERITED = ("HYDRA_FULL_ERROR", "WORLD_SIZE", "RANK", "COLUMNS", "LINES")


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a test's subprocess: this one's, less ``NOT_INHERITED``, with
    ``OMP_NUM_THREADS=1`` and ``tests/`` on ``PYTHONPATH``; ``extra`` is applied last (its
    ``PYTHONPATH`` goes first on the path, ``HYDRA_FULL_ERROR`` in it is kept)."""
    extra = dict(extra or {})
    env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
    path = [extra.pop("PYTHONPATH", None), str(TESTS), os.environ.get("PYTHONPATH")]
    return {**env, "OMP_NUM_THREADS": "1", **extra, "PYTHONPATH": os.pathsep.join(filter(None, path))}


class Cli:
    """``python -m trainkit ARGS`` in a folder (``cwd``, by default the test's ``tmp_path``).

    ``launcher`` is what runs ``-m trainkit``: Python itself, ``(*TORCHRUN, "--nproc-per-node=2",
    ...)``, or any wrapper command that ends in the Python executable.
    """

    def __init__(self, cwd: Path):
        self.cwd = cwd

    def __call__(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 timeout: float = 600, stdin: str | None = None,
                 launcher: Sequence[str] = PYTHON) -> subprocess.CompletedProcess:
        """Run to the end (``subprocess.TimeoutExpired`` after ``timeout`` s); text output captured."""
        return subprocess.run([*launcher, "-m", "trainkit", *args], cwd=cwd or self.cwd, env=subprocess_env(env),
                              text=True, capture_output=True, timeout=timeout, input=stdin)

    def start(self, *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
              launcher: Sequence[str] = PYTHON, **popen) -> subprocess.Popen:
        """Start without waiting (to signal it); stdout and stderr are text pipes unless ``popen``
        says otherwise (``stdout=subprocess.DEVNULL``, ``start_new_session=True``, ...)."""
        options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
        return subprocess.Popen([*launcher, "-m", "trainkit", *args], cwd=cwd or self.cwd, env=subprocess_env(env),
                                **options)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """The trainkit command line, run in this test's ``tmp_path`` (module-scoped fixtures build
    their own ``Cli(folder)``)."""
    return Cli(tmp_path)


@pytest.fixture
def compose():
    from trainkit.cli import compose as compose_config

    return compose_config


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key} differs (max {float((a[key] - b[key]).abs().max()):.3g})"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def train_runs(root: Path, runs: dict[str, list[str]]) -> dict[str, Path]:
    """Train each named list of overrides in-process into ``root/<name>``; name -> its last.pt."""
    from trainkit import train_model
    from trainkit.cli import compose

    for name, overrides in runs.items():
        train_model(compose(overrides), run_dir=root / name)
    return {name: root / name / "checkpoints" / "last.pt" for name in runs}
