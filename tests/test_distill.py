"""Knowledge distillation: the loss formula, a frozen teacher, exact resume, DDP, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import ConfigError, Preempted

QUIET = ["logging.progress_bar=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A small trained digits teacher (wider than the student), as a checkpoint path."""
    from trainkit.cli import compose

    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose(["+experiment=digits_mlp", "model.hidden_sizes=[64]", "trainer.max_steps=30", *QUIET])
    train_model(cfg, run_dir=run_dir)
    return run_dir / "checkpoints" / "best.pt"


def distill(compose, tmp_path, name, teacher, *overrides):
    cfg = compose(["+experiment=digits_distill", f"loss.teacher_ckpt={teacher}", *QUIET, *overrides])
    return train_model(cfg, run_dir=tmp_path / name)


def test_kd_loss_equals_the_formula(teacher):
    from trainkit.techniques.distill import DistillationLoss

    loss = DistillationLoss(teacher_ckpt=str(teacher), temperature=2.0, alpha=0.3, ignore_index=-1,
                            in_features=64, out_features=10)
    student = [[1.0, -0.5, 0.2], [0.3, 0.9, -1.2], [5.0, 0.0, 0.0]]
    teacher_logits = [[2.0, 0.1, -0.3], [-0.4, 1.5, 0.2], [0.0, 9.0, 0.0]]
    targets = [0, 2, -1]  # the last row is padding: left out of both terms
    total, terms = loss.distill(torch.tensor(student), torch.tensor(teacher_logits), torch.tensor(targets))

    def softmax(row, t=1.0):
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    kl = sum(pt * math.log(pt / ps) for s, t, y in zip(student, teacher_logits, targets) if y != -1
             for pt, ps in zip(softmax(t, 2.0), softmax(s, 2.0)))
    ce = sum(-math.log(softmax(s)[y]) for s, y in zip(student, targets) if y != -1)
    assert float(terms["kd"]) == pytest.approx(4.0 * kl, rel=1e-6)
    assert float(terms["task"]) == pytest.approx(ce, rel=1e-6)
    assert float(total) == pytest.approx(0.3 * 4.0 * kl + 0.7 * ce, rel=1e-6)


class TeacherProbe:
    """A callback recording what the teacher looks like during a run (tests on sys.path)."""

    seen: list[dict] = []

    def on_fit_start(self, trainer) -> None:
        teacher = trainer.task.loss_fn.teacher
        self.start = {k: v.clone() for k, v in teacher.state_dict().items()}
        student = {id(p) for p in trainer.model.parameters()}
        optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        TeacherProbe.seen.append({"shared": any(id(p) in student | optimized for p in teacher.parameters())})

    def on_step_end(self, trainer) -> None:
        teacher = trainer.task.loss_fn.teacher
        record = TeacherProbe.seen[-1]
        record["ever_training"] = record.get("ever_training", False) or teacher.training or any(
            m.training for m in teacher.modules())
        record["ever_grad"] = record.get("ever_grad", False) or any(
            p.requires_grad or p.grad is not None for p in teacher.parameters())

    def on_fit_end(self, trainer) -> None:
        now = trainer.task.loss_fn.teacher.state_dict()
        TeacherProbe.seen[-1]["unchanged"] = all(torch.equal(now[k], v) for k, v in self.start.items())


def test_teacher_stays_frozen_and_out_of_checkpoints(compose, tmp_path, teacher):
    TeacherProbe.seen.clear()
    distill(compose, tmp_path, "run", teacher, "trainer.max_steps=25", "model.dropout=0.3", "loss.alpha=0.7",
            "trainer.log_every_n_steps=5", "+callbacks.probe={_target_: test_distill.TeacherProbe}")
    (record,) = TeacherProbe.seen
    assert record == {"shared": False, "ever_training": False, "ever_grad": False, "unchanged": True}
    teacher_state = torch.load(teacher, weights_only=True)["model"]
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "run/checkpoints" / name, weights_only=True)  # plain containers only
        assert set(state["model"]) == {"blocks.0.0.weight", "blocks.0.0.bias", "head.weight", "head.bias"}
        assert state["model"]["blocks.0.0.weight"].shape == (32, 64)
        assert not any(torch.equal(v, teacher_state.get(k, torch.empty(0))) for k, v in state["model"].items())
    # The KD and task terms are logged apart: train/loss = alpha * kd + (1 - alpha) * task.
    events = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [e for e in events if "train/loss/kd" in e]
    assert len(logged) == 5
    for e in logged:
        assert e["train/loss"] == pytest.approx(0.7 * e["train/loss/kd"] + 0.3 * e["train/loss/task"], rel=1e-6)


def test_distillation_resumes_bitwise(compose, tmp_path, teacher):
    common = ["trainer.max_steps=30", "model.dropout=0.3", "trainer.eval_every_n_steps=10",
              "trainer.save_every_n_steps=10"]
    distill(compose, tmp_path, "whole", teacher, *common)
    with pytest.raises(Preempted):
        distill(compose, tmp_path, "first", teacher, *common,
                "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 13}")
    distill(compose, tmp_path, "second", teacher, *common, "resume=auto")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))


def test_a_plain_task_with_the_distillation_loss_is_refused(compose, tmp_path, teacher):
    with pytest.raises(ConfigError, match="task=distill_classification"):
        distill(compose, tmp_path, "plain", teacher, "task=classification", "trainer.max_steps=25")


def test_teacher_output_mismatch_is_a_config_error(compose, tmp_path, teacher):
    cfg = compose(["+experiment=digits_distill", f"loss.teacher_ckpt={teacher}", "+model.out_features=5", *QUIET])
    with pytest.raises(ConfigError, match="loss.teacher_ckpt"):
        train_model(cfg, run_dir=tmp_path / "mismatch")


def test_missing_teacher_is_exit_2_naming_the_key(cli):
    out = cli("train", "+experiment=nmt_distill")
    assert out.returncode == 2 and "loss.teacher_ckpt" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", "+experiment=digits_distill", "loss.teacher_ckpt=nowhere/best.pt")
    assert out.returncode == 2 and "loss.teacher_ckpt=nowhere/best.pt: no such file" in out.stderr


@pytest.mark.slow
def test_token_level_distillation_for_translation(compose, tmp_path):
    tiny = ["data.max_pairs=1000", "data.vocab_size=128", "data.max_tokens=1024", "task.num_samples=0",
            "trainer.max_steps=3", "scheduler.warmup_steps=2", *QUIET]
    train_model(compose(["+experiment=nmt_tiny", *tiny]), run_dir=tmp_path / "teacher")
    student = ["+experiment=nmt_distill", f"loss.teacher_ckpt={tmp_path / 'teacher/checkpoints/last.pt'}",
               "model.d_model=32", "model.num_heads=2", "model.num_encoder_layers=1",
               "model.num_decoder_layers=1", "model.ffn_dim=64", "trainer.log_every_n_steps=1", *tiny]
    result = train_model(compose(student), run_dir=tmp_path / "student")
    events = [json.loads(line) for line in (tmp_path / "student/metrics.jsonl").read_text().splitlines()]
    assert all(e["train/loss/kd"] > 0 and e["train/loss/task"] > 0 for e in events if "train/loss" in e)
    assert "val/bleu" in result.metrics
    # A teacher with another vocabulary cannot teach token ids it does not share.
    with pytest.raises(ConfigError, match="tokenizer differs"):
        train_model(compose([*student, "data.vocab_size=160"]), run_dir=tmp_path / "other")


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch(cli, tmp_path, teacher):
    common = ["+experiment=digits_distill", f"loss.teacher_ckpt={teacher}", "data.shuffle=false",
              "model.dropout=0", "trainer.max_steps=12", "scheduler=none", "trainer.log_every_n_steps=4", *QUIET]
    runs = {"ddp": ["data.batch_size=32", "distributed.nproc_per_node=2"], "single": ["data.batch_size=64"]}
    for name, extra in runs.items():
        out = cli("train", *common, *extra, f"hydra.run.dir=outputs/{name}")
        assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/single/checkpoints/last.pt"), atol=1e-6)
    events = [json.loads(line) for line in (tmp_path / "outputs/ddp/metrics.jsonl").read_text().splitlines()]
    assert any("train/loss/kd" in e for e in events)
