"""Multirun sweeps the way users run them: summaries, failures, preemption, resumed sweeps,
Optuna, the joblib and submitit launchers, the Slurm config, and ``trainkit report``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import Cli

QUICK = ["+experiment=digits_mlp", "trainer.max_epochs=1"]  # 20 optimizer steps, ~1 s a job
GRID = ["optimizer.lr=1e-3,3e-3", "scheduler=cosine,none"]


def sweep(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``trainkit train -m`` of quick digits jobs into ``cwd/sweep``."""
    return Cli(cwd)("train", "-m", *QUICK, "hydra.sweep.dir=sweep", *overrides, env=env)


def summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as file:
        return list(csv.DictReader(file))


def job_record(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A finished 2x2 grid sweep (4 jobs); tests that change it work on a copy."""
    cwd = tmp_path_factory.mktemp("grid")
    out = sweep(cwd, *GRID)
    assert out.returncode == 0, out.stderr
    return cwd / "sweep"


def test_grid_gives_a_sorted_four_row_summary(grid):
    rows = summary(grid)
    assert len(rows) == 4
    assert {(r["optimizer.lr"], r["scheduler"]) for r in rows} == {
        ("0.001", "cosine"), ("0.001", "none"), ("0.003", "cosine"), ("0.003", "none")}
    assert all(r["status"] == "ok" for r in rows)
    best = [float(r["best val/accuracy"]) for r in rows]
    assert best == sorted(best, reverse=True)  # digits_mlp monitors val/accuracy, mode max
    for row in rows:
        result = json.loads((grid / row["run_dir"] / "result.json").read_text())
        assert float(row["val/accuracy"]) == result["final"]["val/accuracy"]
        assert "optimizer.lr=" in row["overrides"] and float(row["test/accuracy"]) > 0
    text = (grid / "summary.md").read_text()
    assert "4 jobs (4 ok)" in text and "Common overrides: `+experiment=digits_mlp trainer.max_epochs=1`" in text
    assert text.count("\n| ") == 5  # header and four jobs


def test_every_job_logs_tensorboard_hparams(grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(grid / "0" / "tb"))
    events.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(events.PluginTagToContent("hparams"))
    assert "hparam/val/accuracy" in events.Tags()["scalars"]


def test_report_prints_the_table_and_writes_a_png(grid, cli, tmp_path, capsys):
    out = cli("report", str(grid))
    assert out.returncode == 0, out.stderr
    assert "| job | status | optimizer.lr | scheduler | best val/accuracy" in out.stdout
    assert (grid / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from trainkit.commands.report import report

    picture = report(grid / "0", out=tmp_path / "run.png")
    assert "# Run" in capsys.readouterr().out and picture.read_bytes()[:4] == b"\x89PNG"
    out = cli("report", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "neither a sweep" in out.stderr


@pytest.mark.slow
def test_rerun_completes_only_the_missing_jobs(grid, tmp_path):
    shutil.copytree(grid, tmp_path / "sweep")
    swept = tmp_path / "sweep"
    kept = {n: (swept / n / "result.json").stat().st_mtime_ns for n in ("0", "1")}
    (swept / "2" / "result.json").unlink()  # stopped mid-way: last.pt but no result.json
    shutil.rmtree(swept / "3")  # never started
    out = sweep(tmp_path, *GRID)
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert "job 0 finished in an earlier run" in log and "job 1 finished in an earlier run" in log
    assert "job 2: continuing from" in log and "resumed from" in (swept / "2" / "train.log").read_text()
    assert {n: (swept / n / "result.json").stat().st_mtime_ns for n in ("0", "1")} == kept
    assert (swept / "3" / "result.json").exists()
    assert [r["status"] for r in summary(swept)] == ["ok"] * 4
    out = sweep(tmp_path, "optimizer.lr=1e-2,3e-3", "scheduler=cosine,none")  # another grid: refused
    assert out.returncode == 2 and "holds job 0 of another sweep" in out.stderr


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_finishes_when_rerun(cli, tmp_path):
    """SIGTERM while job 1 runs (as a cluster's preemption would); the same command again
    skips job 0 and continues (or restarts) job 1."""
    args = ["train", "-m", "+experiment=digits_mlp", "trainer.max_epochs=2", "hydra.sweep.dir=sweep",
            "optimizer.lr=1e-3,3e-3"]
    running = cli.start(*args, stdout=subprocess.DEVNULL)
    job_1 = tmp_path / "sweep" / "1" / "job.json"
    while not job_1.exists() and running.poll() is None:
        time.sleep(0.05)
    running.send_signal(signal.SIGTERM)
    _, stderr = running.communicate(timeout=120)
    assert running.returncode in (75, -signal.SIGTERM), stderr  # 75 when the loop was running
    assert job_record(tmp_path / "sweep" / "0")["status"] == "ok"
    assert job_record(tmp_path / "sweep" / "1")["status"] in ("preempted", "running")  # "running": killed
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert "job 0 finished in an earlier run" in out.stdout + out.stderr
    assert [r["status"] for r in summary(tmp_path / "sweep")] == ["ok"] * 2


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = sweep(tmp_path, "model.activation=relu,bogus")
    assert out.returncode == 0, out.stderr
    rows = summary(tmp_path / "sweep")
    assert [r["model.activation"] for r in rows] == ["relu", "bogus"]  # failed jobs sort last
    assert rows[0]["status"] == "ok" and float(rows[0]["best val/accuracy"]) > 0.5
    assert rows[1]["status"].startswith("failed: ") and "activation='bogus'" in rows[1]["status"]
    assert rows[1]["best val/accuracy"] == ""
    assert "Traceback" in (tmp_path / "sweep" / "1" / "train.log").read_text()


def test_a_preempted_job_stops_the_sweep(tmp_path):
    out = sweep(tmp_path, "optimizer.lr=1e-3,3e-3", "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 3}")
    assert out.returncode == 75, out.stderr
    assert job_record(tmp_path / "sweep" / "0")["status"] == "preempted"
    assert (tmp_path / "sweep" / "0" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "sweep" / "1" / "job.json").exists()  # not started
    assert [r["status"] for r in summary(tmp_path / "sweep")] == ["preempted"]


@pytest.mark.slow
def test_optuna_sweep_of_three_trials(tmp_path):
    out = sweep(tmp_path, "+hparams_search=digits_optuna", "hydra.sweeper.n_trials=3", "logging.mlflow=true",
                "logging.mlflow_tracking_uri=sqlite:///multirun/mlflow.db")
    assert out.returncode == 0, out.stderr
    swept = tmp_path / "sweep"
    rows = summary(swept)
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert {"optimizer.lr", "optimizer.weight_decay", "model.hidden_sizes", "model.dropout"} <= set(rows[0])
    assert (swept / "optuna.db").exists()
    assert "Directions: ['maximize']" in out.stdout + out.stderr  # from trainer.monitor_mode: max
    best_value = float((swept / "optimization_results.yaml").read_text().split("best_value:")[1])
    assert best_value == pytest.approx(float(rows[0]["best val/accuracy"]))
    assert_mlflow_parent_and_children(tmp_path, swept)


def only_sweep_dir(cwd: Path) -> Path:
    """The sweep dir a run without hydra.sweep.dir made: one, holding every job."""
    sweeps = list((cwd / "multirun" / "digits_mlp").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def assert_mlflow_parent_and_children(cwd: Path, swept: Path) -> None:
    """The sweep is one MLflow parent run in multirun/mlflow.db with one FINISHED child per job,
    each holding its job's overrides as params and its final validation metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'multirun' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("digits_mlp").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"summary.md", "summary.csv"}
    children = {run.data.tags["trainkit.job"]: run for run in runs if run not in parents}
    rows = summary(swept)
    assert len(children) == len(rows) and len(runs) == len(rows) + 1
    for row in rows:
        child = children[row["job"]]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and child.info.status == "FINISHED"
        for override in row["overrides"].split():
            key, value = override.lstrip("+~").split("=", 1)
            assert child.data.params[f"override.{key}"] == value
        assert child.data.metrics["val/accuracy"] == float(row["val/accuracy"])


@pytest.mark.slow
def test_joblib_runs_four_parallel_jobs_as_mlflow_children_of_one_parent(cli, tmp_path):
    """4 jobs at once write to one SQLite file: no write is lost (issue 17)."""
    out = cli("train", "-m", *QUICK, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "logging.mlflow=true")
    assert out.returncode == 0, out.stderr
    assert "Joblib.Parallel(n_jobs=4" in out.stdout + out.stderr
    swept = only_sweep_dir(tmp_path)
    assert [r["status"] for r in summary(swept)] == ["ok"] * 4
    assert job_record(swept / "0")["torch_threads"] == 1
    assert_mlflow_parent_and_children(tmp_path, swept)


@pytest.mark.slow
def test_submitit_local_runs_two_jobs(cli, tmp_path):
    out = cli("train", "-m", *QUICK, "optimizer.lr=1e-3,3e-3", "hydra/launcher=submitit_local",
              "hydra.launcher.cpus_per_task=1", "logging.mlflow=true")
    assert out.returncode == 0, out.stderr
    swept = only_sweep_dir(tmp_path)
    assert [r["status"] for r in summary(swept)] == ["ok", "ok"]
    assert (swept / ".submitit").is_dir()
    assert job_record(swept / "1")["torch_threads"] == 1
    assert_mlflow_parent_and_children(tmp_path, swept)


def test_slurm_config_writes_the_batch_script(tmp_path):
    """No cluster here: a stand-in sbatch keeps the script submitit writes, then refuses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "sbatch: no cluster" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    out = sweep(tmp_path, "optimizer.lr=1e-3,3e-3", "hydra/launcher=slurm", "hydra.launcher.partition=test",
                env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_COPY": str(script)})
    assert out.returncode == 1 and "no cluster" in out.stderr
    text = script.read_text()
    for line in ("#SBATCH --array=0-1", "#SBATCH --cpus-per-task=8", "#SBATCH --partition=test",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=240", "submitit.core._submit"):
        assert line in text, line


def test_a_missing_plugin_names_what_to_install(cli):
    out = cli("train", "-m", *QUICK, "hydra/sweeper=nevergrad")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install hydra-nevergrad-sweeper" in out.stderr
    from trainkit.commands.failures import missing_plugin

    message = missing_plugin(Exception("In 'hydra/config': Could not find 'hydra/launcher/joblib'"))
    assert message.startswith("hydra/launcher=joblib needs the Hydra plugin hydra-joblib-launcher")
    assert "pip install 'trainkit[sweep]'" in message


def test_limit_threads_gives_each_job_its_share():
    from omegaconf import OmegaConf

    from trainkit.commands.sweep import limit_threads

    cores = os.cpu_count() or 1
    try:
        torch.set_num_threads(64)
        assert limit_threads(OmegaConf.create({"n_jobs": 2})) == max(1, cores // 2)
        torch.set_num_threads(64)
        assert limit_threads(OmegaConf.create({"n_jobs": -1})) == 1  # joblib: one job per core
        assert limit_threads(OmegaConf.create({"cpus_per_task": 3, "n_jobs": None})) == 1  # never raised
        torch.set_num_threads(64)
        assert limit_threads(OmegaConf.create({"cpus_per_task": 3})) == 3
        assert limit_threads(OmegaConf.create({})) == 3  # the basic launcher: untouched
    finally:
        torch.set_num_threads(1)
