"""Preemption, crash safety and non-finite losses: a kill never costs a run its work."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import Preempted, TrainingFailed

TESTS = Path(__file__).parent
DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=3", "model.dropout=0.2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from trainkit.cli import compose

    root = tmp_path_factory.mktemp("whole")
    train_model(compose(DIGITS), run_dir=root / "run")
    return load_weights(root / "run/checkpoints/last.pt")


@pytest.mark.parametrize("trial", range(5))
def test_sigterm_at_a_random_step_then_resume_is_bitwise_exact(compose, tmp_path, uninterrupted, trial):
    step = random.Random(trial).randrange(1, 60)  # 60 steps in 3 epochs of 20
    if trial == 0:
        step = 27  # mid-epoch for sure
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, f"+callbacks.term={{_target_: fault_helpers.SignalAtStep, step: {step}}}"]),
                    run_dir=tmp_path / "runs" / "first")
    state = torch.load(tmp_path / "runs/first/checkpoints/last.pt", weights_only=True)
    assert state["trainer_state"]["global_step"] == step
    train_model(compose([*DIGITS, "resume=auto"]), run_dir=tmp_path / "runs" / "second")
    assert_same_weights(uninterrupted, load_weights(tmp_path / "runs/second/checkpoints/last.pt"))


def test_sigusr1_also_preempts(compose, tmp_path):
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, "+callbacks.usr={_target_: fault_helpers.SignalAtStep, step: 4, signal_name: SIGUSR1}"]),
                    run_dir=tmp_path / "run")
    assert (tmp_path / "run/checkpoints/last.pt").exists()


def cli(cwd, *args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "trainkit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_external_sigterm_exits_75_and_resume_auto_continues(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    process = subprocess.Popen([sys.executable, "-m", "trainkit", "train", "+experiment=digits_mlp",
                                "trainer.max_epochs=1000", "scheduler=none", "trainer.log_every_n_steps=1"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("outputs/digits_mlp/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr[-2000:]
    (run,) = tmp_path.glob("outputs/digits_mlp/*")
    stopped = torch.load(run / "checkpoints/last.pt", weights_only=True)["trainer_state"]["global_step"]
    assert stopped > 0
    out = cli(tmp_path, "train", "+experiment=digits_mlp", "trainer.max_epochs=1000", "scheduler=none", "resume=auto",
              f"+callbacks.stop={{_target_: trainkit.callbacks.StopAt, step: {stopped + 3}}}")
    assert out.returncode == 75, out.stderr[-2000:]
    assert f"step {stopped}" in out.stderr + out.stdout


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    common = [f"{o}" for o in DIGITS if o != "logging.progress_bar=false"] + ["trainer.save_every_n_steps=1"]
    out = cli(tmp_path, "train", *common, "+callbacks.kill={_target_: fault_helpers.KillDuringSave, step: 33}")
    assert out.returncode == -signal.SIGKILL
    (run,) = tmp_path.glob("outputs/digits_mlp/*")
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)  # the previous one, intact
    assert state["trainer_state"]["global_step"] == 32
    out = cli(tmp_path, "train", *common, "resume=auto")
    assert out.returncode == 0, out.stderr[-2000:]
    newest = max(tmp_path.glob("outputs/digits_mlp/*"))
    assert_same_weights(uninterrupted, load_weights(newest / "checkpoints/last.pt"))


def test_resume_auto_skips_a_corrupt_newest_checkpoint(compose, tmp_path, caplog):
    first = tmp_path / "outputs" / "a"
    train_model(compose([*DIGITS, "trainer.max_epochs=1"]), run_dir=first)
    second = tmp_path / "outputs" / "b"
    train_model(compose([*DIGITS, "trainer.max_epochs=2"]), run_dir=second)
    last = second / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    result = train_model(compose([*DIGITS, "trainer.max_epochs=2", "resume=auto"]), run_dir=tmp_path / "outputs" / "c")
    assert "skipping" in caplog.text and "b/checkpoints/last.pt" in caplog.text
    assert result.global_step == 40  # continued from a's 20 steps


def nan_run(compose, tmp_path, *overrides):
    return train_model(compose([*DIGITS, "model._target_=fault_helpers.NanAtCall", "+model.nan_call=7",
                                "trainer.save_every_n_steps=2", *overrides]), run_dir=tmp_path / "run")


def test_nan_policy_error_stops_before_the_update(compose, tmp_path):
    with pytest.raises(TrainingFailed, match=r"step 7 .*last.pt"):
        nan_run(compose, tmp_path)
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["trainer_state"]["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_policy_skip_drops_the_update_and_goes_on(compose, tmp_path):
    result = nan_run(compose, tmp_path, "trainer.nan_policy=skip")
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["trainer_state"]["skipped_steps"] == 1 and result.global_step == 60
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [event[key] for event in events for key in ("train/loss", "train/epoch_loss") if key in event]
    # A non-finite value is written as the string "nan": it must not appear at all.
    assert losses and all(isinstance(value, float) and math.isfinite(value) for value in losses), losses


def test_nan_policy_skip_gives_up_after_consecutive_skips(compose, tmp_path):
    with pytest.raises(TrainingFailed, match="in a row"):
        train_model(compose([*DIGITS, "optimizer.lr=1e30", "scheduler=none", "trainer.clip_grad_norm=null",
                             "trainer.nan_policy=skip", "trainer.max_consecutive_skips=3"]), run_dir=tmp_path / "run")


def test_old_torch_is_refused(monkeypatch, tmp_path):
    import trainkit.core.checkpoint as checkpoint_module
    from trainkit.core.errors import ConfigError

    monkeypatch.setattr(checkpoint_module.torch, "__version__", "2.5.1+cpu")
    with pytest.raises(ConfigError, match=r"torch 2.5.1\+cpu is too old: trainkit needs torch >= 2.6"):
        checkpoint_module.load(tmp_path / "any.pt")
