"""The config ``trainkit train`` runs with: Hydra composes ``trainkit.conf`` (the package's
``conf/``) and the overrides against the schema.

:func:`compose` gives that config without starting a run (no run directory, no logging):
``trainkit validate`` and the tests use it. Nothing here imports torch.
"""

from __future__ import annotations

import os
from typing import Any

CONFIG_MODULE = "trainkit.conf"


def compose(overrides: list[str], config_dir: str | None = None) -> Any:
    """The config ``trainkit train`` would run with these overrides (no run directory);
    ``config_dir`` is searched before the package's configs, as ``--config-dir`` is."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from trainkit.core.schema import register_schema

    register_schema()
    if config_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"]
    with initialize_config_module(version_base="1.3", config_module=CONFIG_MODULE):
        return hydra_compose(config_name="config", overrides=overrides)
