"""Contrastive task and gradient cache: equal to the full batch, RNG replay, resume, DDP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import Preempted
from trainkit.core.precision import Precision
from trainkit.data.arrays import FILES
from trainkit.models import MLP
from trainkit.tasks.contrastive import ContrastiveTask, info_nce_sum, recall_at_1

QUIET = ["logging.progress_bar=false"]


def digits(n: int) -> torch.Tensor:
    return torch.as_tensor(np.load(FILES / "digits.npz")["x"][:n], dtype=torch.float32) / 16.0


def step(task: ContrastiveTask, model: torch.nn.Module, images: torch.Tensor, precision: Precision):
    """(summed loss, parameter gradients) of one forward_backward, from a fixed RNG state."""
    torch.manual_seed(123)
    model.zero_grad(set_to_none=True)
    loss, _ = task.forward_backward(model, (images, torch.zeros(len(images))), len(images), precision)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [8, 12, 40])
def test_gradient_cache_equals_the_full_batch(chunk_size):
    """In float64 (precision fp64), where only summation order may differ: 1e-10."""
    torch.manual_seed(0)
    precision = Precision(torch.device("cpu"), param_dtype="float64")
    model = precision.prepare_model(MLP(64, 16, hidden_sizes=[32], dropout=0.0))
    images = precision.prepare_batch(digits(40))
    full_loss, full_grads = step(ContrastiveTask(64), model, images, precision)
    cached_loss, cached_grads = step(ContrastiveTask(64, gradient_cache_chunk_size=chunk_size), model, images, precision)
    assert full_loss.dtype == torch.float64
    torch.testing.assert_close(cached_loss, full_loss, atol=1e-10, rtol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-10, rtol=0, msg=lambda m, k=name: f"{k}: {m}")
    assert float(full_loss.detach()) > 0


class Recorder(torch.nn.Module):
    """Wraps an encoder and records every output (to compare first pass and re-run)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.outputs = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        self.outputs.append(out.detach().clone())
        return out


def test_chunk_reruns_replay_dropout_and_the_rng_continues_once():
    torch.manual_seed(0)
    model = Recorder(MLP(64, 16, hidden_sizes=[32], dropout=0.5)).train()
    task = ContrastiveTask(64, gradient_cache_chunk_size=10)
    torch.manual_seed(7)
    task.forward_backward(model, (digits(30), torch.zeros(30)), 30.0, Precision(torch.device("cpu")))
    after = torch.get_rng_state()
    first, rerun = model.outputs[:3], model.outputs[3:]
    assert len(rerun) == 3 and all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert not torch.equal(first[0][0], first[0][1])  # dropout was active
    # The RNG ends where one pass of views + chunks leaves it: replays do not consume draws.
    torch.manual_seed(7)
    pairs = task.views(digits(30))
    with torch.no_grad():
        for chunk in pairs.split(10):
            task.encode(model.inner, chunk)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize("name, dtype, scaling", [("bf16", "bfloat16", False), ("fp16", "float16", True)])
def test_gradient_cache_under_autocast_and_scaling(name, dtype, scaling):
    torch.manual_seed(0)
    model = MLP(64, 16, hidden_sizes=[32], dropout=0.0)
    precision = Precision(torch.device("cpu"), dtype, scaling, name)
    full_loss, full_grads = step(ContrastiveTask(64), model, digits(32), precision)
    cached_loss, cached_grads = step(ContrastiveTask(64, gradient_cache_chunk_size=8), model, digits(32), precision)
    torch.testing.assert_close(cached_loss, full_loss, atol=1e-4, rtol=1e-3)
    for name_, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name_], grad, atol=2e-2 * float(grad.abs().max()), rtol=0)  # bf16 keeps ~3 digits


def test_info_nce_and_recall_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.1]])
    logits = torch.nn.functional.normalize(a) @ torch.nn.functional.normalize(b).T / 0.5
    expected = (-logits.log_softmax(1).diagonal().sum() - logits.log_softmax(0).diagonal().sum()) / 2
    torch.testing.assert_close(info_nce_sum(a, b, 0.5), expected)
    assert recall_at_1(a, b) == 1.0  # row 2: (0, 1) is nearer (1, 0.1) than (1, 0)
    assert recall_at_1(a, b.flip(0)) == 0.0


def test_augmented_views_shift_and_stay_in_range():
    task = ContrastiveTask(64, max_shift_pixels=1, noise_std=0.0)
    images = digits(16)
    views = task.views(images, torch.Generator().manual_seed(0))
    assert views.shape == (16, 2, 64) and views.min() >= 0 and views.max() <= 1
    assert not torch.equal(views[:, 0], views[:, 1])
    again = task.views(images, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)  # a seeded generator gives the same views


def test_bad_chunk_size_names_the_key(compose):
    from trainkit.core.errors import ConfigError
    from trainkit.run.build import build

    cfg = compose(["+experiment=digits_contrastive", "trainer.gradient_cache.chunk_size=0"])
    with pytest.raises(ConfigError, match="trainer.gradient_cache.chunk_size=0"):
        build(cfg, cfg.seed)


def contrastive(compose, tmp_path, name, *overrides):
    cfg = compose(["+experiment=digits_contrastive", "trainer.max_steps=12", "scheduler.warmup_steps=2",
                   "trainer.log_every_n_steps=4", *QUIET, *overrides])
    return train_model(cfg, run_dir=tmp_path / name)


def test_preset_reports_recall_and_resumes_bitwise(compose, tmp_path):
    # 1,259 images / 256 = 5 steps an epoch: step 7 is mid-epoch; dropout and views use the RNG.
    whole = contrastive(compose, tmp_path, "whole", "trainer.eval_every_n_steps=6")
    assert 0.0 <= whole.metrics["val/recall_at_1"] <= 1.0 and "test/recall_at_1" in whole.test
    with pytest.raises(Preempted):
        contrastive(compose, tmp_path, "first", "trainer.eval_every_n_steps=6",
                    "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 7}")
    contrastive(compose, tmp_path, "second", "trainer.eval_every_n_steps=6", "resume=auto")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))
    second = json.loads((tmp_path / "second/result.json").read_text())
    assert second["final"] == whole.metrics


@pytest.mark.ddp
@pytest.mark.slow
def test_gradient_cache_under_ddp_equals_plain_ddp(cli, tmp_path):
    common = ["+experiment=digits_contrastive", "model.dropout=0", "trainer.max_steps=6", "scheduler=none",
              "data.batch_size=64", "distributed.nproc_per_node=2", "precision=fp64", *QUIET]
    for name, chunk in (("cached", 16), ("plain", "null")):
        out = cli("train", *common, f"trainer.gradient_cache.chunk_size={chunk}", f"hydra.run.dir=outputs/{name}")
        assert out.returncode == 0, out.stderr[-3000:]
    cached = load_weights(tmp_path / "outputs/cached/checkpoints/last.pt")
    assert {weight.dtype for weight in cached.values()} == {torch.float64}  # only rounding may differ: 1e-10
    assert_same_weights(cached, load_weights(tmp_path / "outputs/plain/checkpoints/last.pt"), atol=1e-10)

