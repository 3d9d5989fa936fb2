"""Profiler traces, layer statistics and activation checkpointing switches."""

from __future__ import annotations

import torch

from trainkit import train_model
from trainkit.models import MLP

QUICK = ["+experiment=digits_mlp", "trainer.max_steps=12", "scheduler=none", "logging.progress_bar=false"]


def tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = set()
    for events in (run_dir / "tb").glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0, "scalars": 0})
        accumulator.Reload()
        found |= set(accumulator.Tags()["histograms"]) | set(accumulator.Tags()["scalars"])
    return found


def test_profiler_writes_a_trace_and_prints_top_operators(compose, tmp_path, caplog):
    caplog.set_level("INFO")
    train_model(compose([*QUICK, "trainer.profile=true", "trainer.profile_wait_steps=1",
                         "trainer.profile_warmup_steps=1", "trainer.profile_active_steps=3"]), run_dir=tmp_path / "run")
    assert list((tmp_path / "run" / "profile").glob("*.pt.trace.json"))
    assert "top operators by self time" in caplog.text and "aten::" in caplog.text


def test_layer_histograms_only_when_asked(compose, tmp_path):
    train_model(compose([*QUICK, "logging.histograms_every_n_steps=5"]), run_dir=tmp_path / "on")
    found = tags(tmp_path / "on")
    assert {"weights/head.weight", "grads/head.weight", "grad_norm/head.weight"} <= found
    train_model(compose(QUICK), run_dir=tmp_path / "off")
    assert not any(tag.startswith(("weights/", "grads/")) for tag in tags(tmp_path / "off"))


def test_mlp_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = MLP(64, 10, hidden_sizes=[32, 32], dropout=0.0)
    checkpointed = MLP(64, 10, hidden_sizes=[32, 32], dropout=0.0, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for model in (plain, checkpointed):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0, msg=name)


def test_gradient_checkpointing_switch_from_the_command_line(compose, tmp_path):
    result = train_model(compose([*QUICK, "model.gradient_checkpointing=true"]), run_dir=tmp_path / "run")
    assert result.global_step == 12
