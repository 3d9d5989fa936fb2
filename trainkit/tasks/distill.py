"""Distillation tasks: classification and translation whose training loss asks a frozen teacher.

Each task runs the student, then the teacher (``loss=distillation``, see ``trainkit.techniques.distill``)
on the same inputs under the same autocast, and returns the summed loss with the ``kd`` and
``task`` terms to log. Only training consults the teacher: validation (the model in eval
mode) reports the task loss and the usual metrics of the student alone.

Never: put the teacher in the student's module tree or give it gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.core.errors import ConfigError
from trainkit.tasks.seq2seq import METRICS, Seq2SeqTask
from trainkit.tasks.supervised import ClassificationTask


def attach(loss_fn: Any, task: str) -> Any:
    """The distillation loss (anything with a ``distill`` method, such as
    ``techniques.distill.DistillationLoss``: a task does not import the technique)."""
    if not callable(getattr(loss_fn, "distill", None)):
        raise ConfigError(f"task={task} needs loss=distillation (got loss {type(loss_fn).__name__}); "
                          "set loss=distillation loss.teacher_ckpt=PATH")
    loss_fn.task_attached = True
    return loss_fn


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the teacher runs: the student's device and parameter dtype (float64 under precision=fp64)."""
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


class DistillClassificationTask(ClassificationTask):
    """Class logits distilled from a teacher classifier; metrics as ``task=classification``."""

    def __init__(self, loss_fn: Callable, num_classes: int, metrics: Sequence[str] = ("accuracy",)):
        super().__init__(attach(loss_fn, "distill_classification"), num_classes, metrics)

    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        inputs, targets = batch
        student = model(inputs)
        if not model.training:
            return self.loss_fn(student, targets), {}
        device, dtype = placement(model)
        teacher = self.loss_fn.teacher_logits(device, inputs, dtype=dtype)
        return self.loss_fn.distill(student, teacher, targets)


class DistillSeq2SeqTask(Seq2SeqTask):
    """Token-level distillation for translation: the KL term is summed over non-pad target
    positions, like the cross-entropy, so the loop's per-token normalisation holds. The
    teacher must use the student's tokenizer (the same token ids)."""

    def __init__(self, loss_fn: Callable, tokenizer: Any, metrics: Sequence[str] = METRICS,
                 beam_size: int = 1, length_penalty: float = 1.0, max_decode_len: int = 128,
                 num_samples: int = 3, bleu_tokenize: str = "13a"):
        loss_fn = attach(loss_fn, "distill_seq2seq")
        teacher_tokenizer = loss_fn.teacher_tokenizer
        if teacher_tokenizer is None or teacher_tokenizer.state_dict() != tokenizer.state_dict():
            raise ConfigError(f"loss.teacher_ckpt={loss_fn.teacher_ckpt}: the teacher's tokenizer differs from this "
                              "run's (its token ids would not match); use the teacher's data settings "
                              "(data.tokenizer, data.vocab_size, data.max_pairs)")
        super().__init__(loss_fn, tokenizer, metrics, beam_size, length_penalty, max_decode_len,
                         num_samples, bleu_tokenize)

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if not model.training:
            return super().loss_sum(model, batch)
        student = model(batch["src"], batch["tgt_in"])
        device, dtype = placement(model)
        teacher = self.loss_fn.teacher_logits(device, batch["src"], batch["tgt_in"], dtype=dtype)
        return self.loss_fn.distill(student.flatten(0, 1), teacher.flatten(0, 1), batch["tgt_out"].flatten())
