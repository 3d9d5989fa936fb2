"""Preemption and crash safety: a SIGTERM or SIGUSR1 at any step, in the final validation,
before the test pass, during start-up or at a random moment of the command exits 75 with a
checkpoint, and resume=auto then ends bitwise equal to the uninterrupted run; a SIGKILL while a
checkpoint is written keeps the previous one. A kill never costs a run its work."""

from __future__ import annotations

import random
import signal
import time

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import TrainResult, train_model
from trainkit.core.errors import Preempted
from trainkit.core.stop import STOP

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=3", "model.dropout=0.2"]


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> TrainResult:
    """The run every stopped-and-resumed run below must equal (its weights: ``uninterrupted``)."""
    from trainkit.cli import compose

    root = tmp_path_factory.mktemp("whole")
    return train_model(compose(DIGITS), run_dir=root / "run")


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[str, torch.Tensor]:
    return load_weights(uninterrupted_run.last_checkpoint)


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


@pytest.mark.slow
def test_external_sigterm_exits_75_and_resume_auto_continues(cli, tmp_path):
    process = cli.start("train", "+experiment=digits_mlp", "trainer.max_epochs=1000", "scheduler=none",
                        "trainer.log_every_n_steps=1")
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
    out = cli("train", "+experiment=digits_mlp", "trainer.max_epochs=1000", "scheduler=none", "resume=auto",
              f"+callbacks.stop={{_target_: trainkit.callbacks.StopAt, step: {stopped + 3}}}")
    assert out.returncode == 75, out.stderr[-2000:]
    assert f"step {stopped}" in out.stderr + out.stdout


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(cli, tmp_path, uninterrupted):
    common = [f"{o}" for o in DIGITS if o != "logging.progress_bar=false"] + ["trainer.save_every_n_steps=1"]
    out = cli("train", *common, "+callbacks.kill={_target_: fault_helpers.KillDuringSave, step: 33}")
    assert out.returncode == -signal.SIGKILL
    (run,) = tmp_path.glob("outputs/digits_mlp/*")
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)  # the previous one, intact
    assert state["trainer_state"]["global_step"] == 32
    out = cli("train", *common, "resume=auto")
    assert out.returncode == 0, out.stderr[-2000:]
    newest = max(tmp_path.glob("outputs/digits_mlp/*"))
    assert_same_weights(uninterrupted, load_weights(newest / "checkpoints/last.pt"))


# stop requests outside fit -----------------------------------------------------------------------
def trainer_state(path) -> dict:
    return torch.load(path, weights_only=True)["trainer_state"]


@pytest.mark.parametrize("phase", ["final_eval", "fit_end"])
def test_sigterm_in_the_final_validation_or_before_the_test_exits_75_and_resumes_exactly(compose, tmp_path, phase,
                                                                                         uninterrupted_run, uninterrupted):
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, f"+callbacks.term={{_target_: fault_helpers.SignalAtPhase, phase: {phase}, step: 60}}"]),
                    run_dir=tmp_path / "runs" / "first")
    assert not STOP.requested  # handled: nothing left over for the next run in this process
    assert trainer_state(tmp_path / "runs/first/checkpoints/last.pt")["global_step"] == 60
    assert not (tmp_path / "runs/first/result.json").exists()
    result = train_model(compose([*DIGITS, "resume=auto"]), run_dir=tmp_path / "runs" / "second")
    assert result.test == uninterrupted_run.test and result.global_step == 60
    assert_same_weights(uninterrupted, load_weights(tmp_path / "runs/second/checkpoints/last.pt"))


def test_a_stop_requested_during_start_up_exits_75_before_the_first_step(compose, tmp_path):
    STOP(signal.SIGTERM)  # what the handler does when the signal comes while the config is built
    with pytest.raises(Preempted, match="before its first step"):
        train_model(compose(DIGITS), run_dir=tmp_path / "run")
    assert not STOP.requested and not (tmp_path / "run/checkpoints/last.pt").exists()


# random SIGTERMs through the command line ---------------------------------------------------------
@pytest.mark.slow
def test_sigterm_at_random_moments_gives_75_or_0_and_resumes_bitwise(cli, tmp_path, uninterrupted):
    """A SIGTERM at a random moment of the whole command (imports, composing, building,
    training, validating, testing): exit 75 (0 if the run had finished), and resume=auto
    then ends with the uninterrupted run's weights."""
    args = ["train", *DIGITS, "hydra.run.dir=outputs/digits_mlp/${trainkit_now:%H-%M-%S-%f}"]
    generator = random.Random(13)
    codes = []
    for trial in range(4):
        cwd = tmp_path / f"trial{trial}"
        cwd.mkdir()
        process = cli.start(*args, cwd=cwd)
        time.sleep(generator.uniform(1.0, 8.0))  # after the handlers are installed (~0.1 s)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        codes.append(process.returncode)
        assert process.returncode in (0, 75), stderr[-2000:]
        if process.returncode == 75:
            resumed = cli(*args, "resume=auto", cwd=cwd, timeout=300)
            if "no earlier checkpoint" in resumed.stderr:  # stopped before its first step: start again
                resumed = cli(*args, cwd=cwd, timeout=300)
            assert resumed.returncode == 0, resumed.stderr[-2000:]
        newest = max((cwd / "outputs" / "digits_mlp").iterdir())
        assert_same_weights(uninterrupted, load_weights(newest / "checkpoints" / "last.pt"))
    assert 75 in codes, codes


def test_a_stop_request_after_the_work_is_done_keeps_the_exit_code(tmp_path):
    """A SIGTERM that arrives while Python shuts down (here from an atexit hook, after the
    command returned) must not turn a finished command's exit code into a death by signal."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = ("import atexit, os, signal\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
            "from trainkit.cli import main\n"
            "main(['validate', '+experiment=digits_mlp'])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
