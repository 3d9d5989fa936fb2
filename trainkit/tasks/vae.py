"""The VAE task: reconstruction + beta * KL, with a beta warm-up and a KL controller.

A batch is ``(x, ...)`` or ``x``; the model returns ``VAEOutput(logits, mu, logvar)`` and
the loss (``loss=vae``, built here when ``loss: null``) gives per-sample reconstruction and
KL. The loss is their beta-weighted sum over the batch; ``train/loss/reconstruction`` and
``train/loss/kl`` are logged unweighted (nats per sample) and ``train/beta`` beside them.

beta for the step with index ``t`` (0-based) is ``beta_scale * min(1, t / beta_warmup_steps)``.
``beta_scale`` starts at ``loss.beta``; with ``kl_target`` set, after the warm-up, each step
whose mean KL (all micro-batches and ranks) is more than ``kl_tolerance`` away from the target
multiplies it by ``exp(kl_gain * clamp((KL - target) / target, -1, 1))``: a KL above target
raises beta, which pushes the KL down, and the other way round. ``beta_scale`` is the only
state and is saved in checkpoints (the task is a callback), so resume is exact. With neither
warm-up nor controller the task never writes beta, and a curriculum may schedule it
(``task.beta``); a curriculum runs after the task's hooks, so it would override both.

Validation reports ``loss`` (at the current beta), ``reconstruction``, ``kl`` and ``elbo``
(``-(reconstruction + kl)``, beta = 1, with the posterior mean decoded) and, in TensorBoard,
``val/reconstructions``: originals above their reconstructions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainkit.callbacks import Callback
from trainkit.core.errors import ConfigError
from trainkit.losses import VAELoss
from trainkit.tasks.base import Task


def inputs_of(batch: Any) -> Tensor:
    """The input of a batch: ``x`` itself, or the first item of ``(x, y)``; labels are unused."""
    return batch if isinstance(batch, Tensor) else batch[0]


def image_grid(rows: Sequence[Tensor], shape: Sequence[int], pad: int = 1, scale: int = 4) -> Tensor:
    """One ``[1, H, W]`` image in [0, 1]: each tensor of ``rows`` (``[n, h*w]``) is one row
    of ``n`` images of ``shape``, white-framed and enlarged ``scale`` times (8x8 is tiny)."""
    images = torch.stack([row.float().reshape(-1, *shape) for row in rows])  # [rows, n, h, w]
    images = F.pad(images, (pad, pad, pad, pad), value=1.0)
    count, n, h, w = images.shape
    grid = images.permute(0, 2, 1, 3).reshape(count * h, n * w)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return grid.clamp(0, 1).unsqueeze(0)


class VAETask(Task, Callback):
    """``task=vae``; see the module docstring. ``num_images`` reconstructions (from the first
    validation batch) go to TensorBoard at each validation; ``image_shape`` defaults to a
    square of ``in_features`` (8x8 for digits), and without one no image is written."""

    def __init__(self, loss_fn: Any = None, beta_warmup_steps: int = 0, kl_target: float | None = None,
                 kl_tolerance: float = 0.5, kl_gain: float = 0.05, beta_min: float = 1e-3,
                 beta_max: float = 100.0, num_images: int = 8, image_shape: Sequence[int] | None = None,
                 in_features: int | None = None):
        self.loss_fn = VAELoss() if loss_fn is None else loss_fn
        if not (hasattr(self.loss_fn, "parts") and hasattr(self.loss_fn, "beta")):
            raise ConfigError(f"task=vae needs loss=vae (reconstruction + beta * KL) or loss=null; "
                              f"got loss {type(self.loss_fn).__name__}")
        checks = [(beta_warmup_steps >= 0, f"task.beta_warmup_steps={beta_warmup_steps}: must be >= 0"),
                  (kl_target is None or kl_target > 0, f"task.kl_target={kl_target}: must be positive (nats) or null"),
                  (kl_tolerance >= 0, f"task.kl_tolerance={kl_tolerance}: must be >= 0"),
                  (kl_gain > 0, f"task.kl_gain={kl_gain}: must be positive"),
                  (0 < beta_min <= beta_max, f"task.beta_min={beta_min}, task.beta_max={beta_max}: need 0 < beta_min <= beta_max"),
                  (num_images >= 0, f"task.num_images={num_images}: must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.beta_warmup_steps, self.kl_target, self.kl_tolerance = beta_warmup_steps, kl_target, kl_tolerance
        self.kl_gain, self.beta_min, self.beta_max = kl_gain, beta_min, beta_max
        self.beta_scale = float(self.loss_fn.beta)
        self.image_shape = self.pick_image_shape(image_shape, in_features) if num_images else None
        self.num_images = num_images
        self.reset_step()

    @staticmethod
    def pick_image_shape(shape: Sequence[int] | None, in_features: int | None) -> tuple[int, ...] | None:
        if shape is not None:
            shape = tuple(int(s) for s in shape)
            if in_features is not None and math.prod(shape) != in_features:
                raise ConfigError(f"task.image_shape={list(shape)}: holds {math.prod(shape)} values, "
                                  f"the data has {in_features} features")
            return shape
        side = math.isqrt(in_features) if in_features else 0
        return (side, side) if side and side * side == in_features else None

    @property
    def beta(self) -> float:
        """The beta of the next step (``task.beta`` for a curriculum)."""
        return self.loss_fn.beta

    @beta.setter
    def beta(self, value: float) -> None:
        self.loss_fn.beta = value

    @property
    def schedules_beta(self) -> bool:
        return self.beta_warmup_steps > 0 or self.kl_target is not None

    # Training ----------------------------------------------------------------------------------
    def count(self, batch: Any) -> int:
        return len(inputs_of(batch))

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x = inputs_of(batch)
        reconstruction, kl = self.loss_fn.parts(model(x), x)
        if self.kl_target is not None and model.training:  # the controller's input, read once per step
            self.step_kl = self.step_kl + kl.detach().double().sum()
            self.step_samples += len(x)
        loss = reconstruction.sum() + self.loss_fn.beta * kl.sum()
        return loss, {"reconstruction": reconstruction.sum(), "kl": kl.sum()}

    def reset_step(self) -> None:
        self.step_kl: Tensor | float = 0.0
        self.step_samples = 0

    def warmup_factor(self, step: int) -> float:
        return min(1.0, step / self.beta_warmup_steps) if self.beta_warmup_steps else 1.0

    def on_fit_start(self, trainer: Any) -> None:
        self.reset_step()
        if self.schedules_beta:
            self.loss_fn.beta = self.beta_scale * self.warmup_factor(trainer.state.global_step)

    def on_step_end(self, trainer: Any) -> None:
        step, used = trainer.state.global_step, self.loss_fn.beta
        if step % trainer.options.log_every_n_steps == 0:
            trainer.logger.log_metrics({"train/beta": used}, step, trainer.state.epoch)
        if self.kl_target is not None and step > self.beta_warmup_steps:
            self.control(trainer)
        self.reset_step()
        if self.schedules_beta:
            self.loss_fn.beta = self.beta_scale * self.warmup_factor(step)

    def control(self, trainer: Any) -> None:
        """One multiplicative update of ``beta_scale`` from the step's mean KL per sample."""
        device = trainer.device
        packed = torch.stack([torch.as_tensor(self.step_kl, dtype=torch.float64, device=device),
                              torch.tensor(float(self.step_samples), dtype=torch.float64, device=device)])
        kl_sum, samples = trainer.dist.sum(packed).tolist()  # .tolist() waits for the device: once a step
        if samples == 0:
            return
        error = kl_sum / samples - self.kl_target
        if abs(error) > self.kl_tolerance:
            relative = max(-1.0, min(1.0, error / self.kl_target))
            self.beta_scale = min(self.beta_max, max(self.beta_min, self.beta_scale * math.exp(self.kl_gain * relative)))

    def state_dict(self) -> dict[str, Any]:
        return {"beta_scale": self.beta_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta_scale = float(state["beta_scale"])

    # Evaluation --------------------------------------------------------------------------------
    def eval_start(self, device: torch.device) -> None:
        from trainkit.metrics import Mean

        # Means over every sample of every rank (.compute() sums over ranks under DDP).
        self.means = {name: Mean().to(device) for name in ("reconstruction", "kl")}
        self.images: list[Tensor] | None = None

    def eval_step(self, model: nn.Module, batch: Any) -> Tensor:
        x = inputs_of(batch)
        output = model(x)
        reconstruction, kl = self.loss_fn.parts(output, x)
        self.means["reconstruction"].update(reconstruction)
        self.means["kl"].update(kl)
        if self.images is None and self.image_shape is not None:
            shown = x[: self.num_images]
            decoded = self.loss_fn.mean(output.logits[: self.num_images])
            self.images = [shown.detach().float().cpu(), decoded.detach().float().cpu()]
        return reconstruction.sum() + self.loss_fn.beta * kl.sum()

    def eval_metrics(self, loss: float) -> dict[str, float]:
        reconstruction, kl = (float(self.means[name].compute()) for name in ("reconstruction", "kl"))
        return {"reconstruction": reconstruction, "kl": kl, "elbo": -(reconstruction + kl)}

    def on_evaluate_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        writer = trainer.logger.writer()
        if writer is not None and self.images:
            writer.add_image("val/reconstructions", image_grid(self.images, self.image_shape), trainer.state.global_step)
