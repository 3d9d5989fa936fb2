"""Composite losses, curriculum schedules, and models that compute their own loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_same_weights, load_weights
from torch import nn

from trainkit import Trainer, train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.losses import CompositeLoss, L2Penalty, loss_and_terms
from trainkit.techniques.curriculum import Schedule, scheduled_value

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false"]


def run(compose, tmp_path, name, *overrides):
    return train_model(compose([*DIGITS, *overrides]), run_dir=tmp_path / name)


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(run_dir, prefix="curriculum/"):
    """Every value logged at a step, merged (each schedule writes its own record)."""
    merged: dict[int, dict] = {}
    for event in events(run_dir):
        if any(key.startswith(prefix) for key in event):
            merged.setdefault(event["step"], {}).update(event)
    return merged


def schedule(name, target, start_value, end_value, **keys):
    fields = ", ".join(f"{k}: {v}" for k, v in {"target": target, "start_value": start_value,
                                                "end_value": end_value, **keys}.items())
    return f"+callbacks.{name}={{_target_: trainkit.curriculum.Schedule, {fields}}}"


# Composite losses ---------------------------------------------------------------------------------
def test_composite_terms_select_outputs_and_targets_and_sum_to_the_total():
    loss = CompositeLoss({
        "ce": {"loss": {"_target_": "torch.nn.CrossEntropyLoss"}, "output_key": "logits", "target_key": 0},
        "penalty": {"loss": {"_target_": "trainkit.losses.L2Penalty"}, "weight": 0.1, "output_key": "logits"},
        "mse": {"loss": {"_target_": "torch.nn.MSELoss"}, "weight": 2.0, "output_key": "value", "target_key": 1},
    })
    torch.manual_seed(0)
    output = {"logits": torch.randn(4, 3), "value": torch.randn(4)}
    target = (torch.tensor([0, 2, 1, 1]), torch.randn(4))
    total, terms = loss_and_terms(loss, output, target)
    expected = {
        "ce": nn.functional.cross_entropy(output["logits"], target[0], reduction="sum"),  # built with sum
        "penalty": 0.1 * 0.5 * output["logits"].pow(2).sum(),
        "mse": 2.0 * nn.functional.mse_loss(output["value"], target[1], reduction="sum"),
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value)
    torch.testing.assert_close(total, sum(expected.values()))
    torch.testing.assert_close(loss(output, target), total)
    assert loss_and_terms(L2Penalty(), output["logits"], None)[1] == {}  # a plain loss: no terms


def test_composite_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"loss.terms.ce.wieght: .*did you mean loss.terms.ce.weight"):
        CompositeLoss({"ce": {"loss": {"_target_": "torch.nn.CrossEntropyLoss"}, "wieght": 2}})
    with pytest.raises(ConfigError, match="the _target_ goes under 'loss'"):
        CompositeLoss({"ce": {"_target_": "torch.nn.CrossEntropyLoss"}})
    with pytest.raises(ConfigError, match=r"loss.terms.ce.loss.label_smothing: .*label_smoothing"):
        CompositeLoss({"ce": {"loss": {"_target_": "torch.nn.CrossEntropyLoss", "label_smothing": 0.1}}})
    loss = CompositeLoss({"ce": {"loss": {"_target_": "torch.nn.CrossEntropyLoss"}, "output_key": "logit"}})
    with pytest.raises(ConfigError, match=r"loss.terms.ce.output_key='logit'.*did you mean logits"):
        loss({"logits": torch.randn(2, 3)}, torch.tensor([0, 1]))


def test_composite_loss_on_digits_logs_each_term(compose, tmp_path):
    result = run(compose, tmp_path, "run", "loss=composite", "loss.terms.logit_l2.weight=0.1",
                 "trainer.max_steps=15", "scheduler.warmup_steps=2", "trainer.log_every_n_steps=5")
    train_events = [e for e in events(tmp_path / "run") if "train/loss/ce" in e]
    assert [e["step"] for e in train_events] == [5, 10, 15]
    for event in train_events:
        assert event["train/loss/logit_l2"] > 0
        assert event["train/loss/ce"] + event["train/loss/logit_l2"] == pytest.approx(event["train/loss"], rel=1e-6)
    assert "val/accuracy" in result.metrics


# Curriculum ---------------------------------------------------------------------------------------
def test_scheduled_values_follow_the_formulas():
    assert [scheduled_value(p, 0.0, 1.0, 10, 20) for p in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert scheduled_value(15, 2.0, 0.0, 10, 20, "cosine") == pytest.approx(1.0)
    assert scheduled_value(12, 2.0, 0.0, 10, 20, "cosine") == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert [scheduled_value(p, 0.0, 1.0, 0, 4, "step", jumps=2) for p in range(6)] == [0, 0, 0.5, 0.5, 1, 1]
    integer = Schedule("loss.max_len", 16, 64, end=4, over="epochs", steps_per_epoch=10)
    integer.integer = True
    assert [integer.value_at(s) for s in (0, 9, 10, 25, 39, 40)] == [16, 16, 28, 40, 52, 64]


def test_schedule_checks_its_keys():
    with pytest.raises(ConfigError, match="callbacks.ls.shape='linar'"):
        Schedule("loss.label_smoothing", 0, 1, shape="linar", name="ls")
    with pytest.raises(ConfigError, match="callbacks.ml.target='data.max_len': data values cannot be scheduled"):
        Schedule("data.max_len", 16, 64, name="ml")
    with pytest.raises(ConfigError, match="did you mean loss"):
        Schedule("los.beta", 0, 1)


def test_curriculum_sets_and_logs_values_on_a_run(compose, tmp_path):
    run(compose, tmp_path, "run", "trainer.max_steps=50", "trainer.log_every_n_steps=5",
        schedule("ls", "loss.label_smoothing", 0.0, 0.2, start=10, end=30),
        schedule("wd", "optimizer.weight_decay", 0.0, 0.1, over="epochs", end=2, shape="step"),
        schedule("drop", "model.blocks.0.2.p", 0.5, 0.0, shape="cosine"))
    logged = by_step(tmp_path / "run")
    for step, event in logged.items():  # logged after step `step`: the value used by index step - 1
        assert event["curriculum/ls"] == pytest.approx(scheduled_value(step - 1, 0.0, 0.2, 10, 30))
        assert event["curriculum/wd"] == (0.1 if step > 40 else 0.0)  # 20 steps an epoch, a jump at epoch 2
        assert event["curriculum/drop"] == pytest.approx(scheduled_value(step - 1, 0.5, 0.0, 0, 50, "cosine"))
    assert sorted(logged) == list(range(5, 55, 5))
    with pytest.raises(ConfigError, match=r"callbacks.ls.target='loss.label_smothing': .*did you mean label_smoothing"):
        run(compose, tmp_path, "typo", "trainer.max_steps=2", "scheduler=none", schedule("ls", "loss.label_smothing", 0.0, 0.2))
    with pytest.raises(ConfigError, match=r"callbacks.lr.target='optimizer.lrate'.*did you mean optimizer.lr"):
        run(compose, tmp_path, "typo2", "trainer.max_steps=2", "scheduler=none", schedule("lr", "optimizer.lrate", 0.0, 0.2))


def test_curriculum_resumes_exactly(compose, tmp_path):
    common = ["trainer.max_epochs=2", "model.dropout=0.3", "logging.tensorboard=false",
              schedule("ls", "loss.label_smoothing", 0.0, 0.3),
              schedule("wd", "optimizer.weight_decay", 0.0, 0.2, over="epochs", end=2)]
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 13}")
    run(compose, tmp_path, "second", *common, "resume=auto")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))


def test_curriculum_reaches_composite_weights_and_vae_beta(compose, tmp_path):
    run(compose, tmp_path, "composite", "loss=composite", "trainer.max_steps=10", "scheduler.warmup_steps=2",
        "trainer.log_every_n_steps=10",
        schedule("l2", "loss.terms.logit_l2.weight", 0.0, 1.0, end=10),
        schedule("ls", "loss.terms.ce.loss.label_smoothing", 0.0, 0.1, end=10))
    last = by_step(tmp_path / "composite")[10]
    assert last["curriculum/l2"] == pytest.approx(0.9) and last["curriculum/ls"] == pytest.approx(0.09)
    train_model(compose(["+experiment=digits_vae", "logging.progress_bar=false", "trainer.max_steps=10",
                         "scheduler.warmup_steps=2", "trainer.log_every_n_steps=10", "task.kl_target=null", "task.beta_warmup_steps=0",
                         schedule("beta", "task.beta", 0.0, 2.0, end=10)]), run_dir=tmp_path / "vae")
    last = [e for e in events(tmp_path / "vae") if "train/beta" in e][-1]
    assert last["train/beta"] == pytest.approx(1.8)


# Models that compute their own loss ---------------------------------------------------------------
class SelfLossMLP(nn.Module):
    """A stand-in for a Hugging Face model: forward(x, y) returns {"loss": mean CE, "logits": ...}."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: tuple[int, ...] = (32,)):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden_sizes[0]), nn.ReLU(), nn.Linear(hidden_sizes[0], num_classes))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"logits": logits, **({"loss": nn.functional.cross_entropy(logits, labels)} if labels is not None else {})}


MODEL_LOSS = ["task=model_loss", "~loss", f"model._target_={__name__}.SelfLossMLP", "~model.dropout",
              "~model.activation", "~model.gradient_checkpointing", "model.hidden_sizes=[32]",
              "trainer.monitor=val/loss", "trainer.monitor_mode=min"]


def test_model_loss_task_trains_a_model_that_returns_its_loss(compose, tmp_path):
    result = run(compose, tmp_path, "run", *MODEL_LOSS, "trainer.max_epochs=3")
    losses = [h["val/loss"] for h in result.history]
    assert losses[-1] < losses[0] < math.log(10) + 0.2  # starts near chance, goes down
    assert "test/loss" in result.test
    with pytest.raises(ConfigError, match=r"task=model_loss: .*~loss on the command line"):
        run(compose, tmp_path, "with_loss", *[o for o in MODEL_LOSS if o != "~loss"])


def test_model_loss_task_explains_an_output_without_loss():
    trainer = Trainer(SelfLossMLP(4, 2), torch.optim.SGD(SelfLossMLP(4, 2).parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="has no loss"):
        trainer.train_step([(torch.randn(3, 4),)])


def test_a_hugging_face_model_trains_without_a_loss_function(monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers is not in .[dev] (model=hf needs it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # built from a config: nothing is downloaded
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.arange(8).repeat(16, 1) % 16  # one sequence to memorise: the loss must fall
    batches = [{"input_ids": ids[i:i + 4], "labels": ids[i:i + 4]} for i in range(0, 16, 4)]
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), max_epochs=5)
    before = trainer.evaluate(batches)["val/loss"]
    trainer.fit(batches)
    assert trainer.evaluate(batches)["val/loss"] < 0.5 * before
