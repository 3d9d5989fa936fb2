"""Sequence-to-sequence (translation): teacher forcing for the loss, decoding for metrics.

The loss is summed over target tokens (padding ignored) and the loop divides by the
target-token count of the whole optimizer step, so accumulation and DDP equal one large
batch whatever the sentence lengths. Validation decodes (greedy, or beam search with
``beam_size`` > 1) and scores detokenized text with sacreBLEU and exact match.
``bleu_tokenize`` is sacreBLEU's tokenizer: ``13a`` (its default) for ordinary text,
``char`` for targets that are single compound words (German numbers), where word 2- to
4-grams do not exist and word BLEU is always 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.core.errors import ConfigError
from trainkit.core.precision import widened
from trainkit.core.ranks import gather_lists
from trainkit.data.tokenizers import Tokenizer
from trainkit.tasks.base import Task
from trainkit.tasks.supervised import use_sum_reduction

METRICS = ("bleu", "exact_match", "perplexity")


class Seq2SeqTask(Task):
    count_unit = "tokens"

    def __init__(self, loss_fn: Callable, tokenizer: Tokenizer, metrics: Sequence[str] = METRICS,
                 beam_size: int = 1, length_penalty: float = 1.0, max_decode_len: int = 128,
                 num_samples: int = 3, bleu_tokenize: str = "13a"):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ConfigError(f"task.metrics: unknown seq2seq metric {unknown[0]!r}; choose from {list(METRICS)}")
        self.loss_fn = use_sum_reduction(loss_fn)
        self.tokenizer, self.metric_names = tokenizer, list(metrics)
        self.beam_size, self.length_penalty = beam_size, length_penalty
        self.max_decode_len, self.num_samples = max_decode_len, num_samples
        self.bleu_tokenize = bleu_tokenize
        self.decode = bool({"bleu", "exact_match"} & set(metrics)) or num_samples > 0

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["tgt_out"] != self.tokenizer.pad_id).sum())  # host tensor: no device sync

    def loss_sum(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = model(batch["src"], batch["tgt_in"])
        return self.loss_fn(widened(logits.flatten(0, 1)), batch["tgt_out"].flatten()), {}

    def eval_start(self, device: torch.device) -> None:
        self.hypotheses: list[str] = []
        self.references: list[str] = []
        self.sources: list[str] = []

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        loss = self.loss_sum(model, batch)[0]
        if self.decode:
            self.hypotheses.extend(self.translate(model, batch["src"]))
            self.references.extend(batch["target_text"])
            if len(self.sources) < self.num_samples:
                self.sources.extend(self.tokenizer.decode(row.tolist()) for row in batch["src"][: self.num_samples])
        return loss

    def translate(self, model: nn.Module, src: Tensor) -> list[str]:
        from trainkit.models.decoding import decode_batch

        tok = self.tokenizer
        max_len = min(self.max_decode_len, 2 * src.shape[1] + 10)
        ids = decode_batch(model, src, tok.bos_id, tok.eos_id, self.beam_size, max_len, self.length_penalty)
        return [tok.decode(row) for row in ids]

    def eval_metrics(self, loss: float) -> dict[str, float]:
        metrics = {"perplexity": math.exp(min(loss, 50.0))} if "perplexity" in self.metric_names else {}
        if not self.decode:
            return metrics
        hypotheses, references = gather_lists(self.hypotheses), gather_lists(self.references)
        if "bleu" in self.metric_names:
            import sacrebleu

            metrics["bleu"] = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=self.bleu_tokenize).score
        if "exact_match" in self.metric_names:
            metrics["exact_match"] = sum(h == r for h, r in zip(hypotheses, references)) / max(1, len(references))
        return metrics


    def eval_text(self) -> str | None:
        rows = zip(self.sources, self.hypotheses, self.references)
        lines = [f"{s}  ->  {h}  (reference: {r})" for s, h, r in list(rows)[: self.num_samples]]
        return "\n".join(lines) or None
