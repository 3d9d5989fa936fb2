"""The checkpoint manager: best.pt follows a run's lineage through resumes (and another run's
best.pt in the same folder is never tested), top-k keeps the true k best of a metric that goes
up and down, callback state is kept by callback name, and a resume with another optimizer is
refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainkit import Trainer, train_model
from trainkit.core.errors import ConfigError, Preempted

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=3", "model.dropout=0.2"]
# val/loss falls every epoch, so with mode=max the first evaluation (step 20) stays the best.
FIRST_IS_BEST = ["trainer.monitor=val/loss", "trainer.monitor_mode=max"]


def trainer_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["trainer_state"]


# best.pt after a resume --------------------------------------------------------------------------
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


# callback state by name --------------------------------------------------------------------------
def test_two_callbacks_of_one_class_keep_their_own_state(compose, tmp_path):
    counters = ["+callbacks.every={_target_: probe_helpers.EveryNth, every: 1}",
                "+callbacks.odd={_target_: probe_helpers.EveryNth, every: 2}"]
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


# top-k with a metric that goes up and down -------------------------------------------------------
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


# a resume with other components ------------------------------------------------------------------
def test_resume_with_another_optimizer_is_a_config_error(compose, tmp_path):
    train_model(compose([*DIGITS, "trainer.max_epochs=1"]), run_dir=tmp_path / "first")
    with pytest.raises(ConfigError, match=r"optimizer state is not of the configured SGD.*momentum"):
        train_model(compose([*DIGITS, "optimizer=sgd", f"resume={tmp_path / 'first/checkpoints/last.pt'}"]),
                    run_dir=tmp_path / "second")
