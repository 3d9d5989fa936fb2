"""Checkpoint files: one plain dict, written atomically, read without unpickling code.

Loading always uses ``torch.load(weights_only=True)``: a file that needs arbitrary
unpickling is refused, and nothing in it runs. Writes go to a temporary file that is
flushed, fsync'ed and renamed over the target, so a crash at any moment leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainkit.errors import ConfigError

MIN_TORCH = (2, 6)


def require_safe_torch() -> None:
    """torch < 2.6 cannot be trusted to load checkpoints safely: refuse to run on it."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise ConfigError(f"torch {torch.__version__} is too old: trainkit needs torch >= 2.6 "
                          "(safe weights_only checkpoint loading); pip install -U torch")

log = logging.getLogger(__name__)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "trainer_state", "rng", "config",
                 "trainkit_version")


def save(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, flush, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ConfigError(f"could not write checkpoint {path}: {error.strerror or error}; "
                          "the previous checkpoint is unchanged") from None
    fsync_directory(path.parent)
    return path


def link(source: Path, target: Path) -> None:
    """Make ``target`` hold the same bytes as ``source``, atomically (hard link, else copy)."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        import shutil

        shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely; every failure is a ``ConfigError`` naming the file and why."""
    require_safe_torch()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = [line.strip() for line in str(error).split("\n") if "Unsupported global" in line]
        if not unsupported:  # not a pickle of anything: junk or a broken file
            raise ConfigError(f"checkpoint {path}: unreadable, truncated or corrupt (not a torch checkpoint)") from None
        raise ConfigError(
            f"checkpoint {path}: refused, it needs arbitrary unpickling, which could run code "
            f"({unsupported[0]}); trainkit loads only plain tensors and containers"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        reason = str(error).split("\n")[0]
        raise ConfigError(f"checkpoint {path}: unreadable, truncated or corrupt ({reason})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (holds a {type(state).__name__})")
    return state


def check_complete(state: dict[str, Any], path: str | Path) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (missing keys: {', '.join(missing)})")


def find_latest(run_root: Path, exclude: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable ``*/checkpoints/last.pt`` under ``run_root``; corrupt ones are skipped
    with a warning."""
    candidates = [p for p in run_root.glob("*/checkpoints/last.pt")
                  if exclude is None or exclude.resolve() not in p.resolve().parents]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            state = load(path)
            check_complete(state, path)
        except ConfigError as error:
            log.warning("resume=auto: skipping %s", error)
            continue
        return path, state
    return None


def capture_rng() -> dict[str, Any]:
    """Every RNG the run draws from, as weights_only-loadable values."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
