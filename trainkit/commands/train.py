"""``trainkit train [overrides]``: the Hydra app around :func:`trainkit.run.train.train_model`.

A full Hydra app: overrides, ``-m`` sweeps, ``--cfg``, ``--help``, ``--config-dir``, sweeper
and launcher plugins. Under torchrun every rank runs this same app and they agree on one run
directory; after a torchrun restart the run continues from its last checkpoint. From the
moment the command starts, SIGTERM/SIGUSR1 end the run at its next safe point (exit 75).
Hydra and torch are imported only when the command runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from trainkit.commands.config import CONFIG_MODULE


def run_train(args: list[str]) -> int:
    """Run the Hydra app with ``args`` as its command line (``sys.argv`` is restored after).
    A multirun job that fails is recorded in the sweep's summary; other errors propagate."""
    from trainkit.core import stop

    stop.install()  # first, before the imports: from now on SIGTERM/SIGUSR1 end the run at its next safe point
    import hydra

    from trainkit.core.schema import register_schema

    register_schema()
    app = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(train_job)
    saved_argv = sys.argv
    sys.argv = ["trainkit train", *args, *torchrun_overrides(args)]
    try:
        app()
    finally:
        sys.argv = saved_argv
    return 0


def train_job(cfg: Any) -> float | None:
    """One job of the app: train ``cfg``. Returns the monitored metric, the objective a
    sweeper optimises; a multirun job that fails returns None instead of ending the sweep."""
    from trainkit.commands.sweep import run_job
    from trainkit.run.train import train_model

    return run_job(cfg, train_model)


def torchrun_overrides(args: list[str]) -> list[str]:
    """The overrides a torchrun rank adds to ``args`` (none outside torchrun): ranks other than
    0 write no Hydra record or log file, and a restarted job resumes unless ``args`` say how."""
    from trainkit.core import ranks
    from trainkit.engine import launcher

    if not ranks.under_torchrun():
        return []
    ranks.agree_on_start_time()  # every rank runs this app: agree on one run directory
    overrides = list(launcher.worker_overrides())
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if restarted and not any(a.startswith("resume=") for a in [*args, *overrides]):
        overrides.append("resume=auto")  # torchrun --max-restarts: continue from the last checkpoint
    return overrides
