"""Non-finite losses (``trainer.nan_policy``): ``error`` stops before the update with a finite
last.pt, ``skip`` drops the update, goes on and logs no NaN, and gives up after
``trainer.max_consecutive_skips`` skips in a row.

Each test runs twice: the CPU's host check, and the accelerator's device-side check (a fused
optimizer skips on its ``found_inf`` flag, read when the loop logs or saves), forced here on
the CPU, where fused AdamW exists too."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainkit import train_model
from trainkit.core.errors import TrainingFailed

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false", "trainer.max_epochs=3", "model.dropout=0.2"]
NAN_AT_7 = ["model._target_=fault_helpers.NanAtCall", "+model.nan_call=7"]  # the 7th training forward


@pytest.fixture(params=["host", "device"])
def digits(request, monkeypatch) -> list[str]:
    """The run's overrides; ``device``: the loop's device-side check, as on an accelerator,
    with fused AdamW."""
    if request.param == "host":
        return DIGITS
    monkeypatch.setattr("trainkit.engine.loop.skips_on_device", lambda device, optimizer: True)
    return [*DIGITS, "+optimizer.fused=true"]


def nan_run(compose, tmp_path, digits, *overrides):
    return train_model(compose([*digits, *NAN_AT_7, "trainer.save_every_n_steps=2", *overrides]), run_dir=tmp_path / "run")


def logged_losses(run_dir) -> list:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [event[key] for event in events for key in ("train/loss", "train/epoch_loss") if key in event]


def test_nan_policy_error_stops_before_the_update(compose, tmp_path, digits):
    with pytest.raises(TrainingFailed, match=r"step 7 .*last.pt"):
        nan_run(compose, tmp_path, digits)
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["trainer_state"]["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_policy_skip_drops_the_update_and_goes_on(compose, tmp_path, digits):
    result = nan_run(compose, tmp_path, digits, "trainer.nan_policy=skip")
    state = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert state["trainer_state"]["skipped_steps"] == 1 and result.global_step == 60
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    losses = logged_losses(tmp_path / "run")
    # A non-finite value is written as the string "nan": it must not appear at all.
    assert losses and all(isinstance(value, float) and math.isfinite(value) for value in losses), losses


def test_a_skipped_step_leaves_no_nan_in_the_logged_losses(compose, tmp_path, digits):
    """Logged every 2 steps: the window holding the skipped step is logged too."""
    result = train_model(compose([*digits, *NAN_AT_7, "trainer.nan_policy=skip", "trainer.log_every_n_steps=2"]),
                         run_dir=tmp_path / "run")
    assert result.global_step == 60
    losses = logged_losses(tmp_path / "run")
    assert len(losses) >= 30
    assert all(isinstance(value, float) and math.isfinite(value) for value in losses), losses


def test_nan_policy_skip_gives_up_after_consecutive_skips(compose, tmp_path, digits):
    with pytest.raises(TrainingFailed, match="in a row"):
        train_model(compose([*digits, "optimizer.lr=1e30", "scheduler=none", "trainer.clip_grad_norm=null",
                             "trainer.nan_policy=skip", "trainer.max_consecutive_skips=3"]), run_dir=tmp_path / "run")
