"""The VAE: loss formulas, beta warm-up and KL controller, the digits_vae preset, exact resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.core.ranks import Dist
from trainkit.losses import GaussianKL, VAELoss, gaussian_kl
from trainkit.models import VAE
from trainkit.models.vae import VAEOutput
from trainkit.tasks import VAETask
from trainkit.tasks.vae import image_grid

VAE_RUN = ["+experiment=digits_vae", "logging.progress_bar=false"]


def run(compose, tmp_path, name, *overrides):
    return train_model(compose([*VAE_RUN, *overrides]), run_dir=tmp_path / name)


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kl_matches_the_closed_form_of_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 3), torch.randn(5, 3)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert float(gaussian_kl(torch.zeros(2, 4), torch.zeros(2, 4)).abs().max()) == 0.0  # q == prior
    output = VAEOutput(torch.zeros(5, 3), mu, logvar)
    torch.testing.assert_close(GaussianKL()(output), expected.sum())


def test_vae_loss_is_reconstruction_plus_beta_kl_summed():
    torch.manual_seed(0)
    x = torch.rand(4, 6)
    output = VAEOutput(torch.randn(4, 6), torch.randn(4, 2), torch.randn(4, 2))
    loss = VAELoss(beta=0.3)
    reconstruction, kl = loss.parts(output, x)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, x, reduction="none").sum(1)
    torch.testing.assert_close(reconstruction, bce)
    torch.testing.assert_close(loss(output, x), bce.sum() + 0.3 * kl.sum())
    squared = VAELoss(reconstruction="gaussian").parts(output, x).reconstruction
    torch.testing.assert_close(squared, 0.5 * (output.logits - x).pow(2).sum(1))
    with pytest.raises(ConfigError, match="loss.reconstruction"):
        VAELoss(reconstruction="laplace")


def test_model_samples_in_training_and_decodes_the_mean_in_eval():
    model = VAE(in_features=64, latent_dim=4, hidden_sizes=(16,))
    x = torch.rand(3, 64)
    first = model(x)
    assert first.logits.shape == (3, 64) and first.mu.shape == first.logvar.shape == (3, 4)
    assert not torch.equal(first.logits, model(x).logits)  # z is sampled
    model.eval()
    assert torch.equal(model(x).logits, model.decode(model(x).mu))


def fake_trainer(step=0, log_every=1000):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step, epoch: logged.append((step, metrics)))
    return SimpleNamespace(state=SimpleNamespace(global_step=step, epoch=0), device=torch.device("cpu"),
                           options=SimpleNamespace(log_every_n_steps=log_every), dist=Dist(),
                           logger=logger, logged=logged)


def test_beta_warms_up_linearly():
    task = VAETask(VAELoss(beta=2.0), beta_warmup_steps=8)
    trainer = fake_trainer()
    task.on_fit_start(trainer)
    betas = [task.beta]
    for step in range(1, 12):
        trainer.state.global_step = step
        task.on_step_end(trainer)
        betas.append(task.beta)
    assert betas == [2.0 * min(1.0, t / 8) for t in range(12)]
    trainer.state.global_step = 4  # a resumed run recomputes the warm-up from the step
    task.on_fit_start(trainer)
    assert task.beta == 1.0


def controlled_beta(kl_per_sample, steps=3, **options):
    task = VAETask(VAELoss(beta=1.0), kl_target=10.0, kl_tolerance=0.5, kl_gain=0.1, **options)
    trainer = fake_trainer()
    task.on_fit_start(trainer)
    for step in range(1, steps + 1):
        task.step_kl, task.step_samples = torch.tensor(4 * kl_per_sample, dtype=torch.float64), 4
        trainer.state.global_step = step
        task.on_step_end(trainer)
    return task.beta


def test_controller_moves_beta_toward_the_kl_target():
    assert controlled_beta(15.0, steps=1) == pytest.approx(math.exp(0.1 * 0.5))  # KL too high: beta up
    assert controlled_beta(5.0, steps=1) == pytest.approx(math.exp(-0.1 * 0.5))  # too low: beta down
    assert controlled_beta(10.3) == 1.0  # within the tolerance: unchanged
    assert controlled_beta(100.0, steps=2) == pytest.approx(math.exp(0.2))  # relative error clamped to 1
    assert controlled_beta(0.0, steps=200, beta_min=0.01) == 0.01
    # During the warm-up the controller waits: beta follows the warm-up only.
    assert controlled_beta(15.0, steps=3, beta_warmup_steps=10) == pytest.approx(0.3)


def test_task_checks_its_options_and_loss(compose):
    with pytest.raises(ConfigError, match="task.kl_target"):
        VAETask(kl_target=-1.0)
    with pytest.raises(ConfigError, match="task=vae needs loss=vae"):
        VAETask(torch.nn.MSELoss())
    with pytest.raises(ConfigError, match="task.image_shape"):
        VAETask(image_shape=[7, 7], in_features=64)
    assert VAETask(in_features=64).image_shape == (8, 8) and VAETask(in_features=10).image_shape is None


def test_preset_and_options_validate(compose):
    from trainkit.run.build import validate

    assert validate(compose(["+experiment=digits_vae"])) == []
    assert validate(compose(["+experiment=digits_mlp", "loss=composite"])) == []
    problems = validate(compose(["+experiment=digits_vae", "loss=cross_entropy"]))
    assert len(problems) == 1 and "task=vae needs loss=vae" in str(problems[0])


def test_image_grid_stacks_originals_over_reconstructions():
    originals, decoded = torch.zeros(3, 64), torch.ones(3, 64)
    grid = image_grid([originals, decoded], (8, 8), pad=1, scale=2)
    assert grid.shape == (1, 2 * 10 * 2, 3 * 10 * 2)
    assert float(grid[0, 2:18, 2:18].max()) == 0.0 and float(grid[0, 22:38, 2:18].min()) == 1.0


def test_digits_vae_trains_and_logs_terms_beta_and_images(compose, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(compose, tmp_path, "run", "trainer.max_steps=30", "trainer.eval_every_n_steps=15",
                 "trainer.log_every_n_steps=5", "task.beta_warmup_steps=10", "task.kl_target=2.0")
    logged = set().union(*events(tmp_path / "run"))
    assert {"train/loss", "train/loss/kl", "train/loss/reconstruction", "train/beta"} <= logged
    assert {"val/loss", "val/reconstruction", "val/kl", "val/elbo"} <= set(result.metrics)
    assert result.monitor == "val/loss" and len(result.history) == 2
    final = result.metrics
    assert final["val/elbo"] == pytest.approx(-(final["val/reconstruction"] + final["val/kl"]))
    betas = [e["train/beta"] for e in events(tmp_path / "run") if "train/beta" in e]
    assert betas[:2] == [0.4, 0.9]  # used in steps 5 and 10 (indices 4 and 9) of a 10-step warm-up
    assert betas[-1] != 1.0  # after the warm-up the controller has moved it
    accumulator = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    accumulator.Reload()
    images = accumulator.Images("val/reconstructions")
    assert [image.step for image in images] == [15, 30] and images[0].height == 2 * 10 * 4


def test_vae_with_controller_resumes_exactly(compose, tmp_path):
    common = ["trainer.max_steps=30", "trainer.eval_every_n_steps=10", "task.beta_warmup_steps=5",
              "task.kl_target=2.0", "logging.tensorboard=false"]
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 13}")
    run(compose, tmp_path, "second", *common, "resume=auto")
    whole = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)
    second = torch.load(tmp_path / "second/checkpoints/last.pt", weights_only=True)
    assert whole["callbacks"]["task"] == second["callbacks"]["task"] != {"beta_scale": 1.0}
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))
