"""The trackers a run's ``logging`` config turns on, built once on the main rank.

metrics.jsonl, TensorBoard (``logging.tensorboard``) and metrics.csv (``logging.csv``) are
files in the run directory (``core.logs.RunLogger`` makes them). ``logging.mlflow`` adds an
MLflow run (``core.mlflow_tracker``): where it is stored and under which sweep parent is
decided where Hydra's config is known, the process the user started (``tracking_context``),
and handed to self-launched DDP workers in an environment variable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainkit.core.mlflow_tracker import (
    MlflowTracker,
    command_line,
    read_parent,
    stored_run_id,
    tracking_uri,
)

CONTEXT_VARIABLE = "TRAINKIT_MLFLOW_CONTEXT"


def tracking_context(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """The store's URI, the sweep's parent run (if this is a sweep job with one) and the job's
    number and overrides: inherited by a self-launched worker, else read from Hydra."""
    inherited = os.environ.get(CONTEXT_VARIABLE)
    if inherited:
        return json.loads(inherited)
    from hydra.types import RunMode

    hydra = hydra_config()
    if hydra is not None and hydra.mode == RunMode.MULTIRUN:
        sweep_dir = Path(str(hydra.sweep.dir))
        uri = tracking_uri(cfg.logging.mlflow_tracking_uri, sweep_dir.parent.parent)
        return {"uri": uri, "parent": read_parent(sweep_dir, uri), "job": hydra.job.num,
                "overrides": list(hydra.overrides.task), "command": command_line()}
    return {"uri": tracking_uri(cfg.logging.mlflow_tracking_uri, Path(run_dir).parent.parent), "parent": None,
            "job": None, "overrides": list(hydra.overrides.task) if hydra is not None else [], "command": command_line()}


@contextmanager
def handed_to_workers(cfg: Any, run_dir: Path) -> Iterator[None]:
    """While inside, workers started by ``distributed.nproc_per_node`` inherit this run's
    tracking context (they have no Hydra config of their own)."""
    if not cfg.logging.mlflow or CONTEXT_VARIABLE in os.environ:
        yield
        return
    os.environ[CONTEXT_VARIABLE] = json.dumps(tracking_context(cfg, run_dir))
    try:
        yield
    finally:
        del os.environ[CONTEXT_VARIABLE]


def hydra_config() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def mlflow_tracker(cfg: Any, run_dir: Path, params: dict[str, Any], config_yaml: str,
                   resume_state: dict[str, Any] | None) -> MlflowTracker | None:
    """The run's MLflow tracker, started (a new run, or the one the resumed checkpoint names),
    or None when ``logging.mlflow`` is off."""
    settings = cfg.logging
    if not settings.mlflow:
        return None
    context = tracking_context(cfg, run_dir)
    overrides = dict(override.lstrip("+~").partition("=")[::2] for override in context["overrides"])
    job = context["job"]
    return MlflowTracker(
        context["uri"], settings.mlflow_experiment or cfg.name, run_dir,
        {**params, **{f"override.{key}": value for key, value in overrides.items()}}, config_yaml,
        run_name=f"{cfg.name} job {job}" if job is not None else f"{cfg.name} {Path(run_dir).name}",
        log_checkpoint=settings.mlflow_log_checkpoint, resume_run_id=stored_run_id(resume_state),
        parent=context["parent"], tags={"trainkit.job": str(job)} if job is not None else {}, command=context["command"],
    ).start()
