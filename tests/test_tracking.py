"""Experiment tracking: metrics.csv and MLflow runs in a SQLite store, read back the way a user
would (pandas, ``mlflow.tracking.MlflowClient``): params, metrics with their steps, tags and
artifacts; a run resumed after SIGTERM continues its MLflow run; DDP logs once; a store that
cannot be written only warns; a URI that cannot be a store is exit 2. Sweeps as parent and
child runs are in tests/test_sweep.py."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from trainkit import train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.core.mlflow_tracker import MlflowTracker
from trainkit.core.trackers import CsvTracker

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=2"]
MLFLOW = ["logging.mlflow=true", "logging.csv=true"]


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def history(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value), ...] in logged order, from metrics.jsonl records."""
    found: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch", "time_s"):
                found.setdefault(key, []).append((record["step"], float(value)))
    return found


def mlflow_history(client: MlflowClient, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """``trainkit train +experiment=digits_mlp logging.mlflow=true logging.csv=true`` in a git
    checkout of the user's own, the best checkpoint logged too."""
    from conftest import Cli

    cwd = tmp_path_factory.mktemp("user")
    git = ["git", "-C", str(cwd), "-c", "user.name=u", "-c", "user.email=u@x"]
    subprocess.run([*git, "init", "-q"], check=True)
    (cwd / "notes.txt").write_text("my experiments\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "start"], check=True)
    out = Cli(cwd)("train", *DIGITS, *MLFLOW, "logging.mlflow_log_checkpoint=true", "hydra.run.dir=outputs/digits/run")
    assert out.returncode == 0, out.stderr[-3000:]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return cwd, cwd / "outputs" / "digits" / "run", commit


def test_the_mlflow_run_holds_params_metrics_tags_and_artifacts(tracked_run):
    cwd, run_dir, commit = tracked_run
    assert (cwd / "outputs" / "mlflow.db").is_file()  # the default store: sqlite at the run root
    client = MlflowClient(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    run = only_run(client, "digits_mlp")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optimizer.lr"] == "0.003" and params["trainer.max_epochs"] == "2"
    assert params["model._target_"] == "trainkit.models.MLP" and params["logging.mlflow"] == "True"
    expected = history(jsonl(run_dir))
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= set(expected)
    assert mlflow_history(client, run.info.run_id, expected) == {k: sorted(v) for k, v in expected.items()}
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["trainkit.run_dir"] == str(run_dir.resolve())
    assert tags["trainkit.command"].startswith("trainkit train +experiment=digits_mlp")
    from trainkit.__about__ import __version__

    assert tags["trainkit.version"] == __version__
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "config.yaml", "train.log", "metrics.csv", "checkpoints"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "", str(cwd / "downloaded")))
    assert json.loads((local / "result.json").read_text()) == json.loads((run_dir / "result.json").read_text())
    assert (local / "checkpoints" / "best.pt").read_bytes() == (run_dir / "checkpoints" / "best.pt").read_bytes()
    assert "optimizer:" in (local / "config.yaml").read_text()


def test_metrics_csv_holds_the_values_of_metrics_jsonl(tracked_run):
    _, run_dir, _ = tracked_run
    table = pd.read_csv(run_dir / "metrics.csv")
    records = jsonl(run_dir)
    assert list(table["step"]) == sorted({record["step"] for record in records})  # one row per logged step
    for record in records:
        row = table[table["step"] == record["step"]].iloc[0]
        for key, value in record.items():
            if key not in ("step", "epoch", "time_s"):
                assert row[key] == pytest.approx(value, rel=1e-12), (record["step"], key)


def test_csv_columns_grow_without_losing_rows_and_a_reopened_file_is_appended(tmp_path):
    tracker = CsvTracker(tmp_path)
    tracker.log_metrics({"train/loss": 1.0}, step=1, epoch=0)
    tracker.log_metrics({"train/loss": 0.5}, step=2, epoch=0)
    tracker.log_metrics({"val/loss": float("nan")}, step=2, epoch=1)  # same step: same row
    tracker.log_metrics({"train/loss": 0.25}, step=3, epoch=1)
    tracker.close()
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table.columns) == ["step", "epoch", "train/loss", "val/loss"]
    assert list(table["train/loss"]) == [1.0, 0.5, 0.25] and list(table["epoch"]) == [0, 1, 1]
    assert table["val/loss"].isna().all()
    again = CsvTracker(tmp_path)  # a sweep job continued in its own directory
    again.log_metrics({"train/loss": 0.125, "test/loss": 0.3}, step=4, epoch=2)
    again.close()
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert list(table["step"]) == [1, 2, 3, 4] and table["test/loss"].iloc[-1] == 0.3


def test_sigterm_then_resume_auto_continues_the_same_mlflow_run(compose, tmp_path):
    root = tmp_path / "outputs" / "digits_mlp"
    stop = "+callbacks.term={_target_: fault_helpers.SignalAtStep, step: 25}"
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, *MLFLOW, stop]), run_dir=root / "a")
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    stopped = only_run(client, "digits_mlp")
    assert stopped.info.status == "KILLED"
    saved = torch.load(root / "a" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["tracking"] == {"mlflow_run_id": stopped.info.run_id}
    train_model(compose([*DIGITS, *MLFLOW, "resume=auto"]), run_dir=root / "b")
    run = only_run(client, "digits_mlp")  # no second run
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    expected = history(jsonl(root / "a") + jsonl(root / "b"))
    assert [step for step, _ in expected["train/loss"]] == [10, 20, 30, 40]  # steps continue, none twice
    assert mlflow_history(client, run.info.run_id, expected) == {k: sorted(v) for k, v in expected.items()}
    assert run.data.tags["trainkit.run_dir"] == str((root / "b").resolve())


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/a-file/mlflow.db", "http://127.0.0.1:9"],
                         ids=["path-through-a-file", "server-not-answering"])
def test_a_store_that_cannot_be_written_warns_once_and_the_run_goes_on(compose, tmp_path, caplog, uri):
    (tmp_path / "a-file").write_text("not a folder")
    cfg = compose([*DIGITS, "trainer.max_epochs=1", "logging.mlflow=true",
                   f"logging.mlflow_tracking_uri={uri.format(tmp=tmp_path)}"])
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        result = train_model(cfg, run_dir=tmp_path / "run")
    assert result.global_step == 20 and (tmp_path / "run" / "result.json").is_file()
    warnings = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "tracking is off for the rest of this run" in warnings[0], warnings
    assert "tracking" not in torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)


def test_a_store_failing_mid_run_warns_once_and_finish_returns(tmp_path, caplog):
    class Broken:
        calls = 0

        def log_batch(self, *args, **kwargs):
            Broken.calls += 1
            raise OSError("disk I/O error")

    tracker = MlflowTracker("sqlite:///x.db", "e", tmp_path, {}, "", "run")
    tracker.client, tracker.run_id = Broken(), "0" * 32
    import threading

    tracker.sender = threading.Thread(target=tracker.send_queued, daemon=True)
    tracker.sender.start()
    with caplog.at_level(logging.WARNING, logger="trainkit"):
        for step in range(1, 50):
            tracker.log_metrics({"train/loss": 1.0 / step}, step, 0)
        tracker.finish("FINISHED")
    assert Broken.calls >= 1 and tracker.failed
    assert len([r for r in caplog.records if "MLflow" in r.getMessage()]) == 1


@pytest.mark.parametrize("uri, says", [
    ("foo://host/x", "unknown scheme 'foo'"),
    ("mlruns", "MLflow's file store"),
    ("sqlite://x.db", "three slashes"),
])
def test_a_uri_that_cannot_be_a_store_is_a_config_error(compose, tmp_path, uri, says):
    from trainkit.run.build import validate

    problems = validate(compose([*DIGITS, "logging.mlflow=true", f"logging.mlflow_tracking_uri={uri}"]))
    assert len(problems) == 1 and "logging.mlflow_tracking_uri" in str(problems[0]) and says in str(problems[0])
    with pytest.raises(ConfigError, match=says):
        train_model(compose([*DIGITS, "logging.mlflow=true", f"logging.mlflow_tracking_uri={uri}"]),
                    run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_invalid_uri_on_the_command_line_is_exit_2(cli):
    out = cli("train", *DIGITS, "logging.mlflow=true", "logging.mlflow_tracking_uri=foo://x")
    assert out.returncode == 2 and "logging.mlflow_tracking_uri='foo://x'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.ddp
def test_ddp_logs_one_mlflow_run_from_rank_0(cli, tmp_path):
    out = cli("train", *DIGITS, *MLFLOW, "distributed.nproc_per_node=2", "hydra.run.dir=outputs/digits/ddp")
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run = only_run(client, "digits_mlp")
    expected = history(jsonl(tmp_path / "outputs" / "digits" / "ddp"))
    assert mlflow_history(client, run.info.run_id, expected) == {k: sorted(v) for k, v in expected.items()}
    assert run.data.params["distributed.nproc_per_node"] == "2" and run.info.status == "FINISHED"
