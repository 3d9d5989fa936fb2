"""MLflow tracking: a run's params, metrics, tags and artifacts in an MLflow store, and a
sweep as one parent run with a child per job.

The store is a SQLite database by default (``sqlite:///<root>/mlflow.db``, ``<root>`` being
``outputs/`` for runs and ``multirun/`` for sweeps: two levels above the run or sweep
directory), or any MLflow tracking URI (a server the user runs). Artifacts of a SQLite store
go beside the database, in ``mlartifacts/``.

Tracking never stops training. A URI that cannot be a tracking store is a ``ConfigError``
before anything is built (``uri_problem``); anything that goes wrong later (a read-only path,
a locked database, a server that does not answer) gives one warning, and the run goes on with
its local files. Writes off the step's hot path: ``log_metrics`` only queues the values; a
background thread sends what is queued in batches, retrying while SQLite reports the database
locked (parallel sweep jobs share one file).

mlflow is imported when a tracker starts, never at start-up (``pip install "trainkit[mlflow]"``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainkit.core.errors import ConfigError
from trainkit.core.trackers import Tracker

log = logging.getLogger("trainkit")
INSTALL_HINT = 'MLflow tracking needs the mlflow extra: pip install "trainkit[mlflow]"'
PARENT_FILE = "mlflow_parent.json"  # in a sweep's directory: the parent run its jobs join
RUN_ID = re.compile(r"[0-9a-f]{32}")
# Tracking-store schemes MLflow knows without plugins ("+driver" suffixes allowed for databases).
SCHEMES = {"sqlite", "http", "https", "databricks", "databricks-uc", "uc", "postgresql", "mysql", "mssql"}
BATCH = 1000  # metrics per log_batch call (MLflow's limit)
PARAMS_BATCH = 100  # params per log_batch call (MLflow's limit)
LOCKED_RETRIES = 8  # SQLite "database is locked": tries, with growing pauses (about 6 s in all)
FLUSH_SECONDS = 2.0  # metrics wait at most this long to be sent together (BENCHMARKS.md: tracking overhead)


# The store --------------------------------------------------------------------------------------
def tracking_uri(configured: str | None, run_root: Path) -> str:
    """``logging.mlflow_tracking_uri``, or, when null, ``MLFLOW_TRACKING_URI`` from the
    environment, or the SQLite database ``<run_root>/mlflow.db`` (an absolute path: every job of
    a sweep, in any folder, writes to the same file)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(run_root) / 'mlflow.db').resolve()}"


def uri_problem(uri: str | None) -> str | None:
    """Why ``logging.mlflow_tracking_uri`` cannot name a tracking store, or None. Checked before
    anything is built (exit 2); whether the store answers is only known when the run starts."""
    if uri is None:
        return None
    key = f"logging.mlflow_tracking_uri={uri!r}"
    scheme = urlparse(uri).scheme.lower().split("+")[0]
    if scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive letter)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true":
            return None
        return (f"{key}: a plain folder is MLflow's file store, which MLflow 3 refuses; "
                "use a SQLite database such as sqlite:///outputs/mlflow.db")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        return (f"{key}: a SQLite URI needs three slashes before a relative path and four before an absolute one "
                "(sqlite:///outputs/mlflow.db, sqlite:////tmp/mlflow.db); sqlite:// alone would be in memory, lost at exit")
    if scheme not in SCHEMES and scheme not in plugin_schemes():
        return (f"{key}: unknown scheme '{scheme}'; use sqlite:///PATH.db, http(s)://HOST:PORT of a tracking server, "
                "or a database URI (postgresql://, mysql://, mssql://)")
    return None


def plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins add (entry point group ``mlflow.tracking_store``)."""
    from importlib.metadata import entry_points

    return {entry.name for entry in entry_points(group="mlflow.tracking_store")}


def quiet_mlflow() -> None:
    """MLflow's own INFO lines (creating tables, migrations) stay out of the console, and an HTTP
    store that does not answer fails in seconds instead of minutes of retries (unless the user
    set these)."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client_for(uri: str):
    """An ``MlflowClient`` on ``uri`` (the store is opened: SQLite tables made on first use)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"logging.mlflow=true: {INSTALL_HINT}") from None
    quiet_mlflow()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store beside the database (``mlartifacts/``); a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, made if missing (parallel jobs may race to make it), brought
    back if it was deleted."""
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root(uri))
        except Exception:  # another job made it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def retry_locked(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, again after a pause while SQLite says the database is locked or busy."""
    for attempt in range(LOCKED_RETRIES):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if attempt == LOCKED_RETRIES - 1 or not re.search(r"database is (locked|busy)", str(error)):
                raise
            time.sleep(0.05 * 2 ** attempt)
    return None


def command_line() -> str:
    """The command the user typed (``trainkit train`` puts ``trainkit train`` in ``sys.argv[0]``)."""
    import sys

    first = sys.argv[0] if sys.argv and sys.argv[0].startswith("trainkit") else "trainkit"
    return " ".join([first, *sys.argv[1:]])


def base_tags(run_dir: Path, command: str | None = None) -> dict[str, str]:
    """Tags every trainkit run and sweep carries: version, the command, the run directory, and
    the git commit of the folder the user ran in, when it is a git checkout."""
    from trainkit.__about__ import __version__

    tags = {"trainkit.version": __version__, "trainkit.run_dir": str(Path(run_dir).resolve()),
            "trainkit.command": command or command_line(), "mlflow.source.name": "trainkit",
            "mlflow.source.type": "LOCAL"}
    commit = git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit(folder: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def stored_run_id(state: Any) -> str | None:
    """The MLflow run id a checkpoint's ``tracking`` entry names, if it is one (checkpoints are
    untrusted input: anything else is ignored)."""
    tracking = state.get("tracking") if isinstance(state, dict) else None
    run_id = tracking.get("mlflow_run_id") if isinstance(tracking, dict) else None
    return run_id if isinstance(run_id, str) and RUN_ID.fullmatch(run_id) else None


# One run ----------------------------------------------------------------------------------------
class MlflowTracker(Tracker):
    """One training run as an MLflow run (main rank only).

    ``start`` opens the store and makes the run, or continues ``resume_run_id`` (from the
    checkpoint a run resumes), with its tags and every config value as a param; ``parent``
    (a sweep's parent run id) makes it a child. ``finish`` sends the queued metrics, the
    artifacts (result.json, the resolved config, train.log, best.pt when ``log_checkpoint``)
    and the run's status. Any failure after ``start`` is one warning; the tracker then stops.
    """

    def __init__(self, uri: str, experiment: str, run_dir: Path, params: dict[str, Any], config_yaml: str,
                 run_name: str, log_checkpoint: bool = False, resume_run_id: str | None = None,
                 parent: str | None = None, tags: dict[str, str] | None = None, command: str | None = None):
        self.uri, self.experiment, self.run_dir = uri, experiment, Path(run_dir)
        self.params, self.config_yaml, self.run_name = params, config_yaml, run_name
        self.log_checkpoint, self.resume_run_id, self.parent = log_checkpoint, resume_run_id, parent
        self.extra_tags, self.command = tags or {}, command
        self.client: Any = None
        self.run_id: str | None = None
        self.failed = False
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.sender: threading.Thread | None = None

    def start(self) -> MlflowTracker:
        self.guarded("could not start the MLflow run", self.open_run)
        if self.run_id is not None:
            self.sender = threading.Thread(target=self.send_queued, name="trainkit-mlflow", daemon=True)
            self.sender.start()
        return self

    def open_run(self) -> None:
        self.client = client_for(self.uri)
        tags = {**base_tags(self.run_dir, self.command), **self.extra_tags}
        if self.parent:
            tags["mlflow.parentRunId"] = self.parent
        run = self.continued_run()
        if run is None:
            experiment = retry_locked(experiment_id, self.client, self.experiment, self.uri)
            run = retry_locked(self.client.create_run, experiment, tags=tags, run_name=self.run_name)
        known: dict[str, str] = {}
        self.run_id = run.info.run_id
        if self.resume_run_id == self.run_id:
            retry_locked(self.client.update_run, self.run_id, status="RUNNING")
            retry_locked(self.send, tags=tags)
            known = run.data.params
        self.send_params({key: value for key, value in self.params.items() if metric_name(key) not in known})
        log.info("MLflow run %s in %s (experiment %r)", self.run_id, self.uri, self.experiment)

    def continued_run(self) -> Any:
        """The run to continue (``resume_run_id``), or None: a new run (warned when the
        checkpoint names a run this store does not have)."""
        if self.resume_run_id is None:
            return None
        try:
            return retry_locked(self.client.get_run, self.resume_run_id)
        except Exception as error:
            if "locked" in str(error):
                raise
            log.warning("MLflow: the checkpoint's run %s is not in %s; this run starts a new one",
                        self.resume_run_id, self.uri)
            return None

    def send_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        items = [Param(metric_name(key), str(value)[:MAX_PARAM_VAL_LENGTH]) for key, value in params.items()]
        for first in range(0, len(items), PARAMS_BATCH):
            retry_locked(self.client.log_batch, self.run_id, params=items[first:first + PARAMS_BATCH])

    def send(self, metrics: list[Any] = (), tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import RunTag

        run_tags = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
        for first in range(0, max(len(metrics), 1), BATCH):
            self.client.log_batch(self.run_id, metrics=list(metrics[first:first + BATCH]),
                                  tags=run_tags if first == 0 else [])

    # Events ---------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        if self.sender is not None and not self.failed:
            self.queue.put((dict(metrics), step, int(time.time() * 1000)))

    def send_queued(self) -> None:
        """The sender thread: what arrives within ``FLUSH_SECONDS`` of the first event in one
        batch (each send costs the loop's process milliseconds of CPU), until ``None`` arrives."""
        from mlflow.entities import Metric

        while True:
            events = [self.queue.get()]
            deadline = time.monotonic() + FLUSH_SECONDS  # one SQLite transaction every few seconds at most
            while events[-1] is not None and len(events) < BATCH:
                try:
                    events.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            done = events[-1] is None
            metrics = [Metric(metric_name(key), float(value), stamp, step)
                       for event in events if event is not None
                       for key, value in event[0].items() for (_, step, stamp) in [event]]
            if metrics and not self.failed:
                self.guarded("could not log metrics to MLflow", retry_locked, self.send, metrics)
            if done:
                return

    def state(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id} if self.run_id is not None else {}

    def finish(self, status: str) -> None:
        """Send what is queued, the artifacts, and the status; safe to call once per run."""
        if self.sender is None:
            return
        self.queue.put(None)
        self.sender.join(timeout=120)
        self.sender = None
        if not self.failed:
            self.guarded("could not store the artifacts in MLflow", self.send_artifacts)
            self.guarded("could not end the MLflow run",
                         retry_locked, self.client.set_terminated, self.run_id, status)

    def send_artifacts(self) -> None:
        retry_locked(self.client.log_text, self.run_id, self.config_yaml, "config.yaml")
        best = self.run_dir / "checkpoints" / "best.pt"
        files = [(self.run_dir / name, None) for name in ("result.json", "train.log", "metrics.csv")]
        files += [(best, "checkpoints")] if self.log_checkpoint else []
        for path, folder in files:
            if path.is_file():
                retry_locked(self.client.log_artifact, self.run_id, str(path), folder)

    def guarded(self, what: str, call: Callable[..., Any], *args: Any) -> None:
        """``call(*args)``; on any error warn once and stop tracking (the run goes on)."""
        try:
            call(*args)
        except ConfigError:
            raise
        except Exception as error:
            if not self.failed:
                self.failed = True
                first_line = (str(error).strip().splitlines() or [""])[0][:300]
                log.warning("%s (%s: %s): MLflow tracking is off for the rest of this run; its metrics stay in "
                            "%s", what, type(error).__name__, first_line, self.run_dir / "metrics.jsonl")


def metric_name(key: str) -> str:
    """MLflow allows letters, digits, ``_ - . / :`` and spaces in a metric's or param's name."""
    return re.sub(r"[^\w\-./: ]", "_", key)


# A sweep ----------------------------------------------------------------------------------------
def start_parent(uri: str, experiment: str, sweep_dir: Path, overrides: list[str]) -> str | None:
    """The parent run of a sweep (made before any job starts, which also makes the SQLite tables
    before parallel jobs race to), recorded in ``<sweep_dir>/mlflow_parent.json``; a rerun of the
    same sweep directory continues it. Returns its id, or None (warned) when MLflow fails."""
    parent = read_parent(sweep_dir, uri)
    try:
        client = client_for(uri)
        if parent is not None:
            client.update_run(parent, status="RUNNING")
            return parent
        tags = {**base_tags(sweep_dir), "trainkit.sweep_dir": str(sweep_dir.resolve())}
        run = client.create_run(experiment_id(client, experiment, uri), tags=tags,
                                run_name=f"sweep {sweep_dir.name}")
        client.log_param(run.info.run_id, "sweep.overrides", " ".join(overrides)[:6000])
    except ConfigError:
        raise
    except Exception as error:
        log.warning("could not make the sweep's MLflow parent run (%s: %s); each job logs its own run",
                    type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "")
        return None
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": uri}) + "\n")
    return run.info.run_id


def read_parent(sweep_dir: Path, uri: str) -> str | None:
    """The parent run id recorded in ``sweep_dir`` for this store, if any (checked: it is a file
    on disk, anyone may have written it)."""
    try:
        record = json.loads((Path(sweep_dir) / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if isinstance(run_id, str) and RUN_ID.fullmatch(run_id) and record.get("tracking_uri") == uri:
        return run_id
    return None


def finish_parent(sweep_dir: Path, uri: str, failed: bool) -> None:
    """End the sweep's parent run (FAILED when a job failed) with the sweep's summary tables."""
    parent = read_parent(sweep_dir, uri)
    if parent is None:
        return
    try:
        client = client_for(uri)
        for name in ("summary.md", "summary.csv"):
            if (sweep_dir / name).is_file():
                retry_locked(client.log_artifact, parent, str(sweep_dir / name))
        retry_locked(client.set_terminated, parent, "FAILED" if failed else "FINISHED")
    except Exception as error:
        log.warning("could not end the sweep's MLflow parent run %s (%s)", parent, type(error).__name__)
