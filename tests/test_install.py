"""A non-editable install (the wheel) works from an unrelated folder: conf/ ships inside."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_wheel_install_trains_from_another_directory(tmp_path):
    wheel_dir = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, timeout=300)
    wheel = next(wheel_dir.glob("trainkit-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Dependencies come from the current environment (a .pth file): the test checks the
    # package, not the package index.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([venv / "bin" / "trainkit", "train", "+experiment=digits_mlp", "trainer.max_epochs=1"],
                         cwd=workdir, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert list(workdir.glob("outputs/digits_mlp/*/result.json"))
    location = subprocess.run([python, "-c", "import trainkit.conf, trainkit; print(trainkit.__file__)"],
                              capture_output=True, text=True, cwd=workdir, env=env)
    assert str(venv) in location.stdout, location.stdout  # the installed copy, not the source tree
