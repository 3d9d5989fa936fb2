"""Knowledge distillation (Hinton et al. 2015): the ``distillation`` loss and its frozen teacher.

``loss=distillation`` builds :class:`DistillationLoss`, which loads a teacher from a trainkit
checkpoint (``loss.teacher_ckpt``), rebuilding the teacher's model from the config stored
inside it. The student's training loss, summed over samples (or non-pad target tokens) so
that the loop's per-step normalisation holds, is::

    alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task loss

where the task loss is cross-entropy with the configured label smoothing. ``T**2`` keeps the
KD gradients on the scale of the task loss whatever the temperature. The tasks in
``trainkit.tasks.distill`` run the teacher and log both parts (``train/loss/kd`` and
``train/loss/task``, unweighted: ``train/loss = alpha * kd + (1 - alpha) * task``).
Validation reports the task loss alone, so a distilled student and one trained without KD
are compared on the same ``val/loss``. ``alpha`` and ``temperature`` are plain attributes:
a callback may schedule them (``trainer.task.loss_fn.alpha``).

Never: train the teacher, let it leave eval mode, or put it in the student's module tree
(so ``model.train()``, the optimizer and checkpoints never see it); read a teacher other
than through ``trainkit.core.checkpoint.read_checkpoint`` (weights only, its stored config
checked against the user's trust list before anything in it is built).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainkit.core.errors import ConfigError
from trainkit.core.precision import widened

log = logging.getLogger("trainkit")
TEACHER_HINT = ("train a teacher first and pass its checkpoint, e.g. `trainkit train +experiment=nmt_base "
                "hydra.run.dir=outputs/teacher_nmt` then loss.teacher_ckpt=outputs/teacher_nmt/checkpoints/best.pt "
                "(digits: +experiment=digits_mlp model.hidden_sizes=[512,512])")


class FrozenTeacher(nn.Module):
    """A model that stays in eval mode with no gradients: ``train()`` cannot switch it back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # the teacher is never trained: dropout stays off

    @torch.no_grad()
    def forward(self, *inputs: Any) -> Tensor:
        return self.model(*inputs)


def load_teacher(path: str | Path, runtime: dict[str, Any]) -> tuple[FrozenTeacher, Any]:
    """The frozen teacher stored in a trainkit checkpoint and its tokenizer (None if it has none).

    The teacher's stored config must be trusted (``trainkit.core.builder.check_trusted``) under the
    trust list of the build that loads it: the run's own ``trust`` key in ``trainkit train``,
    the command line's in ``eval``. Its model is sized by the values stored in its checkpoint;
    ``runtime`` holds the student data's values (in/out features), used for a checkpoint
    written before trainkit stored them (a tokenizer carries the vocabulary sizes).
    """
    from trainkit.core.builder import TRUST
    from trainkit.core.checkpoint import read_checkpoint, stored_runtime
    from trainkit.techniques.rebuild import rebuild_model

    if not Path(path).is_file():
        raise ConfigError(f"loss.teacher_ckpt={path}: no such file; {TEACHER_HINT}")
    state, cfg = read_checkpoint(path, TRUST.get())
    if cfg.get("finetune") is not None:
        raise ConfigError(f"loss.teacher_ckpt={path}: a LoRA checkpoint holds adapters only; merge it first "
                          "(trainkit export format=merged) and distill from the merged checkpoint")
    tokenizer = None
    tokenizer_state = (state.get("data") or {}).get("tokenizer")
    if tokenizer_state is not None:
        from trainkit.data.tokenizers import tokenizer_from_state
        from trainkit.data.translation import runtime_for

        tokenizer = tokenizer_from_state(tokenizer_state)
        runtime = {**runtime, **runtime_for(tokenizer)}
    elif stored_runtime(state, path) is None:
        log.info("loss.teacher_ckpt=%s holds no runtime values (written by an older trainkit): the teacher's "
                 "model is sized from the student's data", path)
    model = rebuild_model(path, state, cfg, "loss.teacher_ckpt", runtime,
                          label="loss.teacher_ckpt (the teacher's model)")
    return FrozenTeacher(model), tokenizer


class DistillationLoss:
    """Task loss plus a temperature-scaled KL term towards a frozen teacher's predictions.

    Called as ``loss(logits, targets)`` it is the task loss alone (what validation reports);
    the distillation tasks call :meth:`distill` with the teacher's logits during training.
    ``in_features``/``out_features``/``ignore_index`` come from the data (``trainkit.run.build``).
    """

    def __init__(self, teacher_ckpt: str | None = None, temperature: float = 2.0, alpha: float = 0.5,
                 label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "sum",
                 in_features: int | None = None, out_features: int | None = None):
        if not teacher_ckpt:
            raise ConfigError(f"loss.teacher_ckpt is required for loss=distillation; {TEACHER_HINT}")
        if not temperature > 0:
            raise ConfigError(f"loss.temperature={temperature}: must be positive")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"loss.alpha={alpha}: must be between 0 (task loss only) and 1 (KD only)")
        if reduction != "sum":
            raise ConfigError(f"loss.reduction={reduction!r}: the distillation loss is summed (the loop normalises)")
        self.teacher_ckpt, self.temperature, self.alpha = str(teacher_ckpt), float(temperature), float(alpha)
        self.label_smoothing, self.ignore_index, self.reduction = label_smoothing, ignore_index, reduction
        runtime = {k: v for k, v in (("in_features", in_features), ("out_features", out_features)) if v is not None}
        self.teacher, self.teacher_tokenizer = load_teacher(teacher_ckpt, runtime)
        self.task_attached = False  # set by a distillation task; a plain task would skip the teacher

    def teacher_logits(self, device: torch.device, *inputs: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The teacher's logits for the student's inputs: on ``device``, its parameters in ``dtype``
        (the student's: ``precision=fp64`` batches are float64), under the caller's autocast."""
        parameter = next(self.teacher.parameters())
        if parameter.device != device or (dtype is not None and parameter.dtype != dtype):
            self.teacher.to(device=device, dtype=dtype)  # once: the loss is built before the trainer places the model
        return self.teacher(*inputs)

    def task_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(widened(logits), targets, ignore_index=self.ignore_index,
                               label_smoothing=self.label_smoothing, reduction="sum")

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        if not self.task_attached:
            raise ConfigError("loss=distillation needs a task that runs the teacher: task=distill_classification "
                              "(class logits) or task=distill_seq2seq (translation)")
        return self.task_loss(logits, targets)

    def distill(self, student: Tensor, teacher: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(summed loss, {"kd": T**2 * KL sum, "task": task loss sum}) for logits ``[N, C]`` and
        targets ``[N]``; positions whose target is ``ignore_index`` (padding) are left out."""
        if student.shape != teacher.shape:
            raise ConfigError(f"loss.teacher_ckpt={self.teacher_ckpt}: the teacher predicts {tuple(teacher.shape)} "
                              f"where the student predicts {tuple(student.shape)}; they must share the outputs")
        keep = targets != self.ignore_index
        # Computed in fp32 whatever the autocast dtype (a KL of near-equal distributions cancels badly
        # in bf16), in fp64 under precision=fp64.
        student_log_probs = F.log_softmax(widened(student[keep]) / self.temperature, dim=-1)
        teacher_log_probs = F.log_softmax(widened(teacher[keep]) / self.temperature, dim=-1)
        kl_sum = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum")
        kd = self.temperature**2 * kl_sum
        task = self.task_loss(student, targets)
        total = self.alpha * kd + (1.0 - self.alpha) * task
        return total, {"kd": kd.detach(), "task": task.detach()}
