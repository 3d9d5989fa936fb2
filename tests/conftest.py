"""Shared fixtures: compose configs the way `trainkit train` does, run in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two cores: keep each test process to one
os.environ.setdefault("TRAINKIT_CACHE", str(Path(__file__).parent.parent / ".pytest_cache" / "trainkit"))


@pytest.fixture
def compose():
    from trainkit.cli import compose as compose_config

    return compose_config


@pytest.fixture
def run_cli(tmp_path):
    """Run `python -m trainkit ...` in a fresh folder; returns the CompletedProcess."""

    def run(*args: str, cwd: Path | None = None, timeout: float = 600, stdin: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run([sys.executable, "-m", "trainkit", *args], cwd=cwd or tmp_path, text=True,
                              capture_output=True, timeout=timeout, input=stdin, env=full_env)

    return run


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
