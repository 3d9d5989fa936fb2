"""The review's bugs in the loop (issue 13, section 3): each test fails on the code before its fix.

best.pt after a resume, NaN in the logged loss under nan_policy=skip, callback state keyed by
class, top-k kept only on improvement, SIGTERM outside fit, an empty batch plan, rank seeds, a
resume with another optimizer. (The DDP ones, 3.5-3.7 and 3.9, are in test_ddp_exact.py.)
"""

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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Trainer, train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.core.seeding import rank_seed
from trainkit.core.stop import STOP

TESTS = Path(__file__).parent
DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=3", "model.dropout=0.2"]
# val/loss falls every epoch, so with mode=max the first evaluation (step 20) stays the best.
FIRST_IS_BEST = ["trainer.monitor=val/loss", "trainer.monitor_mode=max"]


def trainer_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["trainer_state"]


# 3.1 best.pt after resume ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    from trainkit.cli import compose

    run_dir = tmp_path_factory.mktemp("whole") / "run"
    return train_model(compose([*DIGITS, *FIRST_IS_BEST]), run_dir=run_dir)


def stopped_run(compose, run_dir: Path, step: int = 27) -> Path:
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, *FIRST_IS_BEST, f"+callbacks.stop={{_target_: trainkit.callbacks.StopAt, step: {step}}}"]),
                    run_dir=run_dir)
    return run_dir / "checkpoints" / "last.pt"


def test_best_pt_follows_a_resume_into_a_new_directory(compose, tmp_path, whole_run):
    assert trainer_state(whole_run.best_checkpoint)["global_step"] == 20  # the scenario holds
    last = stopped_run(compose, tmp_path / "first")
    result = train_model(compose([*DIGITS, *FIRST_IS_BEST, f"resume={last}"]), run_dir=tmp_path / "second")
    best = tmp_path / "second" / "checkpoints" / "best.pt"
    assert result.best_checkpoint == best and best.is_file()
    assert json.loads((tmp_path / "second" / "result.json").read_text())["best_checkpoint"] == str(best)
    assert trainer_state(best)["global_step"] == 20
    assert result.test == whole_run.test  # tested on the lineage's best, not on the last weights


def test_a_save_after_a_resume_before_any_validation_keeps_the_lineage_best(compose, tmp_path):
    last = stopped_run(compose, tmp_path / "first")
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, *FIRST_IS_BEST, f"resume={last}", "trainer.save_every_n_steps=1",
                             "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 30}"]), run_dir=tmp_path / "second")
    assert trainer_state(tmp_path / "second/checkpoints/last.pt")["global_step"] == 30
    assert trainer_state(tmp_path / "second/checkpoints/best.pt")["global_step"] == 20


def test_a_resume_into_a_directory_with_another_runs_best_pt_ignores_it(compose, tmp_path, whole_run):
    shared = tmp_path / "shared"
    train_model(compose([*DIGITS, "seed=5", "trainer.max_epochs=1"]), run_dir=shared)  # another run's best.pt
    last = stopped_run(compose, tmp_path / "first")
    result = train_model(compose([*DIGITS, *FIRST_IS_BEST, f"resume={last}"]), run_dir=shared)
    assert trainer_state(shared / "checkpoints" / "best.pt")["global_step"] == 20
    assert result.test == whole_run.test


def test_a_foreign_best_pt_is_never_tested(compose, tmp_path):
    """No best.pt of this lineage to be found: the last weights are tested, with a warning,
    and result.json names no best checkpoint."""
    shared = tmp_path / "shared"
    train_model(compose([*DIGITS, "seed=5", "trainer.max_epochs=1"]), run_dir=shared)
    last = stopped_run(compose, tmp_path / "first")
    (last.parent / "best.pt").unlink()  # the lineage's best is gone
    result = train_model(compose([*DIGITS, *FIRST_IS_BEST, f"resume={last}"]), run_dir=shared)
    assert result.best_checkpoint is None
    assert trainer_state(shared / "checkpoints" / "best.pt")["lineage"] != trainer_state(shared / "checkpoints" / "last.pt")["lineage"]


# 3.2 nan_policy=skip -----------------------------------------------------------------------------
def test_a_skipped_step_leaves_no_nan_in_the_logged_losses(compose, tmp_path):
    result = train_model(compose([*DIGITS, "model._target_=fault_helpers.NanAtCall", "+model.nan_call=7",
                                  "trainer.nan_policy=skip", "trainer.log_every_n_steps=2"]), run_dir=tmp_path / "run")
    assert result.global_step == 60
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e[key] for e in events for key in ("train/loss", "train/epoch_loss") if key in e]
    assert len(losses) >= 30
    assert all(isinstance(value, float) and math.isfinite(value) for value in losses), losses


# 3.3 callback state by name ----------------------------------------------------------------------
def test_two_callbacks_of_one_class_keep_their_own_state(compose, tmp_path):
    counters = ["+callbacks.every={_target_: review_helpers.EveryNth, every: 1}",
                "+callbacks.odd={_target_: review_helpers.EveryNth, every: 2}"]
    stop = "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 7}"
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, *counters, stop]), run_dir=tmp_path / "first")
    saved = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)["callbacks"]
    assert saved["every"] == {"count": 7} and saved["odd"] == {"count": 3}
    train_model(compose([*DIGITS, *counters, "trainer.max_epochs=1", "resume=auto"]), run_dir=tmp_path / "second")
    final = torch.load(tmp_path / "second/checkpoints/last.pt", weights_only=True)["callbacks"]
    assert final["every"] == {"count": 20} and final["odd"] == {"count": 10}


def test_a_sequence_of_callbacks_is_named_by_class_and_numbered():
    from trainkit.engine.checkpoints import callback_names

    class A:
        pass

    a1, a2, other = A(), A(), object()
    assert callback_names([a1, other, a2]) == {"A.0": a1, "object": other, "A.1": a2}


# 3.4 top-k with a metric that goes up and down ---------------------------------------------------
def tiny_trainer(tmp_path: Path, **options) -> tuple[Trainer, DataLoader]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    model = nn.Linear(4, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(reduction="sum"),
                      run_dir=tmp_path, **options)
    return trainer, DataLoader(data, batch_size=8)


def test_top_k_keeps_the_true_k_best_of_a_metric_that_goes_up_and_down(tmp_path):
    values = iter([0.5, 0.3, 0.4, 0.35, 0.2, 0.45])  # one evaluation per epoch (2 steps each)
    trainer, loader = tiny_trainer(tmp_path, max_epochs=6, save_top_k=3, monitor="val/score")
    real_evaluate = trainer.evaluate
    trainer.evaluate = lambda batches, prefix="val": {**real_evaluate(batches, prefix), f"{prefix}/score": next(values)}
    trainer.fit(loader, loader)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("top-*.pt"))
    # The three best are 0.2 (step 10), 0.3 (step 4), 0.35 (step 8); 0.5, 0.4, 0.45 fell out.
    assert kept == ["top-step00000004.pt", "top-step00000008.pt", "top-step00000010.pt"]
    for name in kept:
        assert trainer_state(tmp_path / "checkpoints" / name)["global_step"] == int(name[8:16])
    assert trainer_state(tmp_path / "checkpoints" / "last.pt")["top_k"] == [
        [0.2, "top-step00000010.pt"], [0.3, "top-step00000004.pt"], [0.35, "top-step00000008.pt"]]


# 3.7 rank seeds ----------------------------------------------------------------------------------
def test_each_rank_gets_its_own_seed_and_rank_zero_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(8)}
    assert len(seeds) == 8 and rank_seed(7, 3) == rank_seed(7, 3) and rank_seed(8, 3) != rank_seed(7, 3)


# 3.10 stop requests outside fit, and an empty batch plan -----------------------------------------
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    from trainkit.cli import compose

    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = train_model(compose(DIGITS), run_dir=run_dir)
    return result, load_weights(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("phase", ["final_eval", "fit_end"])
def test_sigterm_in_the_final_validation_or_before_the_test_exits_75_and_resumes_exactly(compose, tmp_path, plain_run,
                                                                                         phase):
    with pytest.raises(Preempted):
        train_model(compose([*DIGITS, f"+callbacks.term={{_target_: review_helpers.SignalAt, phase: {phase}, step: 60}}"]),
                    run_dir=tmp_path / "runs" / "first")
    assert not STOP.requested  # handled: nothing left over for the next run in this process
    assert trainer_state(tmp_path / "runs/first/checkpoints/last.pt")["global_step"] == 60
    assert not (tmp_path / "runs/first/result.json").exists()
    result = train_model(compose([*DIGITS, "resume=auto"]), run_dir=tmp_path / "runs" / "second")
    expected, weights = plain_run
    assert result.test == expected.test and result.global_step == 60
    assert_same_weights(weights, load_weights(tmp_path / "runs/second/checkpoints/last.pt"))


def test_a_stop_requested_during_start_up_exits_75_before_the_first_step(compose, tmp_path):
    STOP(signal.SIGTERM)  # what the handler does when the signal comes while the config is built
    with pytest.raises(Preempted, match="before its first step"):
        train_model(compose(DIGITS), run_dir=tmp_path / "run")
    assert not STOP.requested and not (tmp_path / "run/checkpoints/last.pt").exists()


class EmptyEpochs:
    """A loader without batches that fails the test instead of hanging when iterated too often."""

    def __init__(self):
        self.epochs = 0

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        self.epochs += 1
        if self.epochs > 3:
            raise RuntimeError("the loop keeps asking for epochs of an empty loader")
        return iter(())


def test_an_empty_batch_plan_is_refused_with_max_steps(tmp_path):
    model = nn.Linear(2, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(reduction="sum"),
                      max_steps=5)
    with pytest.raises(ConfigError, match="no batches"):
        trainer.fit(EmptyEpochs())


# a resume with other components ------------------------------------------------------------------
def test_resume_with_another_optimizer_is_a_config_error(compose, tmp_path):
    train_model(compose([*DIGITS, "trainer.max_epochs=1"]), run_dir=tmp_path / "first")
    with pytest.raises(ConfigError, match=r"optimizer state is not of the configured SGD.*momentum"):
        train_model(compose([*DIGITS, "optimizer=sgd", f"resume={tmp_path / 'first/checkpoints/last.pt'}"]),
                    run_dir=tmp_path / "second")


# random SIGTERMs through the command line ---------------------------------------------------------
def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "trainkit", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sigterm_at_random_moments_gives_75_or_0_and_resumes_bitwise(tmp_path, plain_run):
    """A SIGTERM at a random moment of the whole command (imports, composing, building,
    training, validating, testing): exit 75 (0 if the run had finished), and resume=auto
    then ends with the uninterrupted run's weights."""
    _, weights = plain_run
    args = [*DIGITS, "hydra.run.dir=outputs/digits_mlp/${trainkit_now:%H-%M-%S-%f}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    env.pop("HYDRA_FULL_ERROR", None)
    generator = random.Random(13)
    codes = []
    for trial in range(4):
        cwd = tmp_path / f"trial{trial}"
        cwd.mkdir()
        process = subprocess.Popen([sys.executable, "-m", "trainkit", "train", *args], cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(generator.uniform(1.0, 8.0))  # after the handlers are installed (~0.1 s)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        codes.append(process.returncode)
        assert process.returncode in (0, 75), stderr[-2000:]
        if process.returncode == 75:
            resumed = cli(cwd, *args, "resume=auto")
            if "no earlier checkpoint" in resumed.stderr:  # stopped before its first step: start again
                resumed = cli(cwd, *args)
            assert resumed.returncode == 0, resumed.stderr[-2000:]
        newest = max((cwd / "outputs" / "digits_mlp").iterdir())
        assert_same_weights(weights, load_weights(newest / "checkpoints" / "last.pt"))
    assert 75 in codes, codes
