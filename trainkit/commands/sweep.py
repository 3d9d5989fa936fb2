"""Multirun sweeps: one job's life inside a sweep, and the summary table at the sweep's root.

``run_job`` is what the Hydra task function calls. In a single run it only trains, and
every exception propagates as before. In a multirun job it also:

- keeps ``job.json`` in the job's directory (job number, overrides, status, monitor);
- records a failing job as ``failed`` and returns None, so the sweep goes on (the Optuna
  sweeper marks the trial failed); a stop request (SIGTERM/SIGUSR1, ``StopAt``) is recorded
  as ``preempted`` and the jobs after it in this process do not start (exit 75);
- makes a sweep resumable: rerun with the same ``hydra.sweep.dir``, a job whose
  ``result.json`` exists is skipped (its stored metric is returned), one with a
  ``checkpoints/last.pt`` continues from it, the others train anew. A job directory holding
  a job with other overrides is never overwritten: the sweep stops with a ConfigError;
- limits torch to the job's share of the cores under the joblib launcher (cores // n_jobs)
  or to ``cpus_per_task`` under submitit.

``SweepSummary`` (a Hydra callback, registered in conf/config.yaml) rewrites ``summary.csv``
and ``summary.md`` at the sweep root whenever a job ends, from the job directories alone, so
parallel jobs on other processes or nodes and a half-finished sweep all give a correct table.
Nothing here imports torch at module level (Hydra loads the callback for every command).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from trainkit.core.errors import ConfigError

log = logging.getLogger("trainkit")
JOB_FILE = "job.json"
SUMMARY_FILES = ("summary.csv", "summary.md")
# Hydra plugins a user may name on the command line -> the package that provides them.

_stopped = False  # a job of this process was preempted: the rest of the sweep does not start


# One job -----------------------------------------------------------------------------------------
def run_job(cfg: Any, train_fn: Callable[[Any], Any]) -> float | None:
    """Train ``cfg`` with ``train_fn`` (returning a TrainResult); return the monitored metric
    (the objective a sweeper optimises), None for a failed multirun job. See the module doc."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainkit.core.errors import Preempted

    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return train_fn(cfg).best_metric
    global _stopped
    job_dir = Path(hydra.runtime.output_dir)
    record = {"job": hydra.job.num, "overrides": list(hydra.overrides.task), "status": "running",
              "error": None, "monitor": cfg.trainer.monitor, "monitor_mode": cfg.trainer.monitor_mode}
    rerun = (f"rerun the same command with hydra.sweep.dir={hydra.sweep.dir} to finish the sweep"
             if hydra.sweeper._target_.endswith("BasicSweeper")  # a grid: job N is the same job every time
             else f"the sweep stopped; its jobs so far are in {hydra.sweep.dir}")
    if _stopped:
        raise Preempted(f"job {record['job']} not started: the sweep was stopped; {rerun}")
    finished = earlier_result(job_dir, record, cfg)
    if finished is not None:
        return finished["best_metric"]
    record["torch_threads"] = limit_threads(hydra.launcher)
    write_json(job_dir / JOB_FILE, record)
    try:
        result = train_fn(cfg)
    except Preempted as error:
        _stopped = True
        write_json(job_dir / JOB_FILE, {**record, "status": "preempted"})
        last = job_dir / "checkpoints" / "last.pt"
        raise Preempted(f"job {record['job']} stopped on request ({last} is resumable); {rerun}") from error
    except Exception as error:  # a failed job is a row of the table, not the end of the sweep
        from trainkit.commands.failures import explain

        log.exception("job %s failed", record["job"])
        message = explain(error)[1].strip().split("\n")[0]
        write_json(job_dir / JOB_FILE, {**record, "status": "failed", "error": message})
        return None
    write_json(job_dir / JOB_FILE, {**record, "status": "ok"})
    return result.best_metric


def earlier_result(job_dir: Path, record: dict[str, Any], cfg: Any) -> dict[str, Any] | None:
    """What an earlier run of the sweep left in ``job_dir``: the job's result.json when it
    finished (the job is then skipped); otherwise ``cfg.resume`` is pointed at its last.pt, if
    any. A directory that holds a job with other overrides is refused (ConfigError)."""
    previous = read_json(job_dir / JOB_FILE)
    if previous is None:
        return None
    if sorted(previous["overrides"]) != sorted(record["overrides"]):
        raise ConfigError(
            f"{job_dir} holds job {previous['job']} of another sweep (overrides: {' '.join(previous['overrides'])}); "
            "rerun the same command to resume it, or choose a new hydra.sweep.dir")
    result = read_json(job_dir / "result.json")
    if result is not None:
        log.info("job %s finished in an earlier run (%s): skipped", record["job"], job_dir / "result.json")
        write_json(job_dir / JOB_FILE, {**record, "status": "ok"})
        return result
    last = job_dir / "checkpoints" / "last.pt"
    if last.exists():
        log.info("job %s: continuing from %s", record["job"], last)
        cfg.resume = str(last)
    return None


def limit_threads(launcher: Any) -> int:
    """Cap torch's threads at this job's share of the cores: ``cpus_per_task`` (submitit) or
    cores // ``n_jobs`` (joblib, negative counts as joblib reads them); never raises the cap.
    Returns the threads torch now uses."""
    import torch

    cores = os.cpu_count() or 1
    n_jobs = launcher.get("n_jobs")
    if launcher.get("cpus_per_task"):
        share = launcher.cpus_per_task
    elif n_jobs:
        share = cores // (n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs))
    else:
        return torch.get_num_threads()
    torch.set_num_threads(max(1, min(share, torch.get_num_threads())))
    return torch.get_num_threads()



# The summary -------------------------------------------------------------------------------------
@dataclass
class JobRow:
    """One job of a sweep: its record (job.json) joined with its result.json, if any."""

    job: int
    overrides: list[str]
    status: str  # ok | failed: <first line of the error> | preempted | running
    monitor: str
    monitor_mode: str
    best_metric: float | None
    metrics: dict[str, float]  # final validation and test metrics, as logged
    run_dir: Path


def collect_rows(sweep_dir: Path) -> list[JobRow]:
    """Every job under ``sweep_dir`` that has a job.json, best first by its monitored metric."""
    rows = []
    for record_path in sweep_dir.rglob(JOB_FILE):
        record = read_json(record_path)
        if record is None:
            continue
        result = read_json(record_path.parent / "result.json") or {}
        status = record["status"] if record["status"] != "failed" else f"failed: {record['error']}"
        rows.append(JobRow(record["job"], record["overrides"], status, record["monitor"], record["monitor_mode"],
                           result.get("best_metric") if record["status"] == "ok" else None,
                           result_metrics(result), record_path.parent))
    return sort_rows(rows)


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The final validation and the test metrics of a result.json (val/epoch_loss repeats val/loss)."""
    return {k: v for part in ("final", "test") for k, v in (result.get(part) or {}).items()
            if not k.endswith("/epoch_loss")}


def sort_rows(rows: list[JobRow]) -> list[JobRow]:
    sign = -1.0 if rows and rows[0].monitor_mode == "max" else 1.0

    def key(row: JobRow) -> tuple:
        value = row.best_metric
        known = isinstance(value, (int, float)) and math.isfinite(value)
        return (not known, sign * value if known else 0.0, row.job)

    return sorted(rows, key=key)


def split_override(override: str) -> tuple[str, str]:
    """'+optimizer.lr=1e-3' -> ('optimizer.lr', '1e-3')."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_keys(rows: list[JobRow]) -> list[str]:
    """The override keys whose values differ between jobs, in first-seen order."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for key, value in map(split_override, row.overrides):
            values.setdefault(key, set()).add(value)
    present = [{split_override(o)[0] for o in row.overrides} for row in rows]
    return [k for k, seen in values.items() if len(seen) > 1 or any(k not in p for p in present)]


def table(rows: list[JobRow], root: Path) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the summary: job, status, swept values, best metric, metrics, run dir."""
    swept = swept_keys(rows)
    metric_names = sorted({k for row in rows for k in row.metrics}, key=lambda k: (not k.startswith("val/"), k))
    header = ["job", "status", *swept, f"best {rows[0].monitor}", *metric_names, "run_dir"]
    cells = []
    for row in rows:
        given = dict(map(split_override, row.overrides))
        cells.append([str(row.job), row.status, *[given.get(k, "") for k in swept], number(row.best_metric),
                      *[number(row.metrics.get(k)) for k in metric_names], relative(row.run_dir, root)])
    return header, cells


def to_markdown(rows: list[JobRow], root: Path, kind: str = "Sweep") -> str:
    """A readable table: the overrides common to all jobs once above it, the swept ones as columns."""
    header, cells = table(rows, root)
    swept = set(swept_keys(rows))
    common = [o for o in rows[0].overrides if split_override(o)[0] not in swept]
    counts = Counter(row.status.split(":")[0] for row in rows)
    lines = [f"# {kind} {root}", ""]
    if kind == "Sweep":
        lines += [f"{len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}), "
                  f"best first by {rows[0].monitor} ({rows[0].monitor_mode}).", ""]
    if common:
        lines += [f"{'Common overrides' if len(rows) > 1 else 'Overrides'}: `{' '.join(common)}`", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" if name == "job" or "/" in name else "---" for name in header) + "|")
    lines += ["| " + " | ".join(readable(cell).replace("|", "\\|") for cell in line) + " |" for line in cells]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[JobRow], root: Path) -> str:
    """Full precision, and every job's complete override list in an ``overrides`` column."""
    header, cells = table(rows, root)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*header[:2], "overrides", *header[2:]])
    for row, line in zip(rows, cells):
        writer.writerow([*line[:2], " ".join(row.overrides), *line[2:]])
    return out.getvalue()


def write_summary(sweep_dir: Path) -> list[JobRow]:
    """Rewrite summary.csv and summary.md at ``sweep_dir`` (atomically); returns the rows."""
    rows = collect_rows(sweep_dir)
    if rows:
        for name, text in zip(SUMMARY_FILES, (to_csv(rows, sweep_dir), to_markdown(rows, sweep_dir))):
            write_text(sweep_dir / name, text)
    return rows


class SweepSummary(Callback):
    """Hydra callback: the sweep root's summary, rewritten whenever a job ends."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from trainkit.core.schema import START_TIME

        # Jobs in other processes (joblib, submitit) resolve ${trainkit_now:...} from this
        # variable, which they inherit: every job lands in this one sweep dir.
        os.environ.setdefault("TRAINKIT_RUN_TIME", str(START_TIME))
        # The Optuna sweeper opens its sqlite study inside the sweep dir before any job makes it.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if config.logging.mlflow:  # one parent run; each job's run is its child
            from trainkit.core.mlflow_tracker import start_parent

            start_parent(sweep_uri(config), config.logging.mlflow_experiment or config.name, sweep_dir,
                         list(config.hydra.overrides.task))

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = write_summary(sweep_dir)
        failed = [row.job for row in rows if row.status.startswith("failed")]
        if config.logging.mlflow:
            from trainkit.core.mlflow_tracker import finish_parent

            finish_parent(sweep_dir, sweep_uri(config), bool(failed))
        log.info("sweep: %d jobs, %d failed%s; summary in %s", len(rows), len(failed),
                 f" (jobs {', '.join(map(str, failed))})" if failed else "", sweep_dir / "summary.md")


def sweep_uri(config: Any) -> str:
    """The sweep's MLflow store: ``logging.mlflow_tracking_uri``, or ``<root>/mlflow.db`` with
    ``<root>`` two levels above the sweep directory (``multirun/``)."""
    from trainkit.core.mlflow_tracker import tracking_uri

    return tracking_uri(config.logging.mlflow_tracking_uri, Path(str(config.hydra.sweep.dir)).parent.parent)


# Small helpers -----------------------------------------------------------------------------------
def number(value: float | None) -> str:
    return "" if value is None else repr(value)


def readable(cell: str) -> str:
    """Four significant digits for a decimal number, any other cell as it is."""
    try:
        return f"{float(cell):.4g}" if any(c in cell for c in ".eE") else cell
    except ValueError:
        return cell


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomic: readers (and parallel jobs rewriting the same summary) never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
