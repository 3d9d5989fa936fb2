"""Hugging Face libraries, loaded offline: the one place trainkit imports ``transformers``
(an optional dependency, ``pip install "trainkit[hf]"``) and checks a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainkit.core.errors import ConfigError

INSTALL_HINT = 'pip install "trainkit[hf]"'


def transformers_module() -> Any:
    """``transformers``, or a ``ConfigError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model=hf needs the transformers package: {INSTALL_HINT}") from None
    transformers.utils.logging.disable_progress_bar()  # its bars (loading, writing shards) would cut trainkit's
    return transformers


def check_directory(directory: str, key: str) -> Path:
    """A local ``save_pretrained`` directory; a hub name or missing folder is a ``ConfigError``."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={directory}: no such directory; trainkit never downloads: write the model "
                          "(or tokenizer) with save_pretrained(DIR) on a machine that has it and pass DIR")
    if key.startswith("model") and not (path / "config.json").is_file():
        raise ConfigError(f"{key}={directory}: holds no config.json, so it is not a save_pretrained directory")
    return path
