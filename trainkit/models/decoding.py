"""Inference-time decoding for :class:`trainkit.models.transformer.Transformer`.

Two strategies, both batched over source sentences:

* :func:`greedy_decode` - argmax at each step, with the incremental key/value cache or (as a
  slow reference used in tests) by re-running the decoder over the whole prefix;
* :func:`beam_search` - fixed-width beam search on top of the cache.

Shared conventions: sources are right-padded with ``model.pad_id``; ``max_len`` counts
generated tokens (BOS excluded, EOS included); results are plain lists of token ids
without BOS and without EOS, truncated at the first EOS.

Dropout must not make decoding random, so both functions switch the model to eval mode
for their duration and then restore every submodule's previous ``training`` flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainkit.core.devices import eval_mode
from trainkit.models.transformer import Transformer

__all__ = ["beam_search", "greedy_decode"]


def _check_max_len(model: Transformer, max_len: int) -> None:
    # The decoder consumes BOS plus max_len - 1 generated tokens (the last token is never
    # fed back), so max_len positions are needed.
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if max_len > model.max_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_len {model.max_len}")


def _strip(tokens: list[int], eos_id: int) -> list[int]:
    """Cut a generated sequence (no BOS) at its first EOS."""
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    max_len: int,
    incremental: bool = True,
) -> list[list[int]]:
    """Returns one token-id list per source row, without BOS and without EOS (stopping at the first EOS). incremental=False re-runs the decoder on the whole prefix every step (the slow reference)."""
    _check_max_len(model, max_len)
    with eval_mode(model):
        memory, src_pad_mask = model.encode(src)
        batch = src.size(0)
        ys = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)
        cache = model.new_cache() if incremental else None
        for _ in range(max_len):
            if cache is not None:
                logits = model.decode(ys[:, -1:], memory, src_pad_mask, cache)[:, -1]
            else:
                logits = model.decode(ys, memory, src_pad_mask)[:, -1]
            next_token = logits.argmax(dim=-1)
            # Rows that already ended keep being computed (the batch stays rectangular);
            # feeding them padding makes clear that what follows is discarded.
            next_token = next_token.masked_fill(finished, model.pad_id)
            ys = torch.cat([ys, next_token.unsqueeze(1)], dim=1)
            finished |= next_token.eq(eos_id)
            if bool(finished.all()):
                break
    return [_strip(row, eos_id) for row in ys[:, 1:].tolist()]


@torch.no_grad()
def beam_search(
    model: Transformer,
    src: Tensor,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    max_len: int = 128,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Batched beam search with the incremental cache; returns the best hypothesis per row.

    Scoring is the *plain* length normalisation ``sum log-prob / len ** length_penalty``
    (not GNMT's ``((5 + len) / 6) ** alpha``), where ``len`` counts generated tokens
    including the final EOS; ``length_penalty=0`` ranks by raw sum of log-probs and the
    default 1.0 by mean log-prob per token. A hypothesis cut off by ``max_len`` has no EOS
    and is scored on its ``max_len`` tokens.

    Per source row the search keeps ``beam_size`` live hypotheses and the ``beam_size``
    best finished ones. Each step takes the ``2 * beam_size`` best extensions; EOS
    extensions ranked within the first ``beam_size`` are offered to the finished set, the
    best ``beam_size`` non-EOS extensions stay live (there are always enough: each beam has
    only one EOS extension). A row is done once its finished set is full and its best live
    hypothesis, normalised at its current length, does not beat the worst finished one
    (the usual heuristic: it assumes the live hypothesis would end now). Merely stopping at
    ``beam_size`` finished hypotheses would let cheap early EOS extensions of the top
    beam end the search before the top beam itself finishes. At ``max_len`` the live
    hypotheses of unfinished rows join the finished sets. With ``beam_size=1`` this is
    exactly :func:`greedy_decode`: the single live beam follows the argmax, and the first
    time that argmax is EOS the row is done.
    """
    _check_max_len(model, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    batch, k = src.size(0), beam_size
    finished = _FinishedHypotheses(batch, k, length_penalty)
    with eval_mode(model):
        memory, src_pad_mask = model.encode(src)
        # Each source row is repeated once per beam: rows b*k .. b*k+k-1 belong to source b.
        # Only the first decode call reads these; afterwards the cache holds its own copies.
        memory = memory.repeat_interleave(k, dim=0)
        src_pad_mask = src_pad_mask.repeat_interleave(k, dim=0)
        cache = model.new_cache()

        tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=src.device)
        # All beams start from the same BOS; only beam 0 is live at first, otherwise the
        # first step would fill the beam with k copies of the same extensions.
        beam_scores = torch.full((batch, k), float("-inf"), device=src.device)
        beam_scores[:, 0] = 0.0
        for step in range(max_len):
            logits = model.decode(tokens[:, -1:], memory, src_pad_mask, cache)[:, -1]
            candidates = _select_candidates(beam_scores, torch.log_softmax(logits.float(), dim=-1), eos_id)
            finished.add_eos_extensions(tokens, candidates, length=step + 1)
            tokens, beam_scores, parent = _keep_live(tokens, candidates, k)
            if finished.update_done(beam_scores[:, 0].tolist(), length=step + 1):
                break
            cache.reorder(parent)
        else:
            finished.add_live(tokens, beam_scores, max_len)
    return finished.best(eos_id)


# Candidate selection ----------------------------------------------------------------------------

@dataclass
class _Candidates:
    """The ``2 * k`` best one-token extensions per source row, sorted best first; each
    tensor is [B, n] with n = min(2k, k * vocab)."""

    scores: Tensor  # summed log-probs of the extended hypotheses
    beam: Tensor  # which live beam (0..k-1) each extends
    token: Tensor  # the token each appends
    is_eos: Tensor


def _select_candidates(beam_scores: Tensor, log_probs: Tensor, eos_id: int) -> _Candidates:
    """beam_scores [B, k] of the live beams, log_probs [B*k, V] of their next token."""
    batch, k = beam_scores.shape
    vocab = log_probs.size(-1)
    candidates = (beam_scores.view(-1, 1) + log_probs).view(batch, k * vocab)
    scores, index = candidates.topk(min(2 * k, k * vocab), dim=1)  # sorted, best first
    token = index % vocab
    return _Candidates(scores, index // vocab, token, token.eq(eos_id))


def _keep_live(tokens: Tensor, candidates: _Candidates, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k best non-EOS extensions stay live (there are always enough: each beam has only
    one EOS extension): EOS sorts behind, candidate rank is kept, so beam 0 is always the
    best live hypothesis. Returns the new tokens [B*k, T+1], their scores [B, k] and each
    new beam's parent row in ``tokens`` [B*k] (for reordering the cache)."""
    batch, n_cand = candidates.scores.shape
    rank = torch.arange(n_cand, device=tokens.device).expand(batch, n_cand)
    order = (rank + candidates.is_eos.long() * n_cand).argsort(dim=1)[:, :k]
    beam_scores = candidates.scores.gather(1, order)
    row_offset = torch.arange(batch, device=tokens.device).unsqueeze(1) * k  # [B, 1]
    parent = (row_offset + candidates.beam.gather(1, order)).view(-1)
    tokens = torch.cat([tokens.index_select(0, parent), candidates.token.gather(1, order).view(-1, 1)], dim=1)
    return tokens, beam_scores, parent


# Finished-hypothesis bookkeeping ----------------------------------------------------------------

class _FinishedHypotheses:
    """Per source row, the ``k`` best finished hypotheses as (normalised score, tokens without
    BOS/EOS) pairs, and whether the row is done (no live hypothesis can still get in)."""

    def __init__(self, batch: int, k: int, length_penalty: float) -> None:
        self.k = k
        self.length_penalty = length_penalty
        self.rows: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def normalise(self, score: float, length: int) -> float:
        return score / (length**self.length_penalty)

    def offer(self, b: int, score: float, hyp: list[int]) -> None:
        """Keep ``hyp`` if row ``b`` has room or it beats the row's worst finished one."""
        hyps = self.rows[b]
        if len(hyps) < self.k:
            hyps.append((score, hyp))
            return
        worst = min(range(self.k), key=lambda i: hyps[i][0])
        if score > hyps[worst][0]:
            hyps[worst] = (score, hyp)

    def add_eos_extensions(self, tokens: Tensor, candidates: _Candidates, length: int) -> None:
        """EOS extensions ranked within the first k candidates finish a hypothesis of
        ``length`` tokens (EOS included). Lower-ranked ones are ignored; with k=1 that is
        what makes this greedy."""
        k = self.k
        hits = (candidates.is_eos[:, :k] & torch.isfinite(candidates.scores[:, :k])).nonzero().tolist()
        for b, j in hits:
            if not self.done[b]:
                prefix = tokens[b * k + int(candidates.beam[b, j]), 1:].tolist()
                self.offer(b, self.normalise(candidates.scores[b, j].item(), length), prefix)

    def update_done(self, best_live: list[float], length: int) -> bool:
        """A row is done once its finished set is full and its best live score, normalised at
        ``length``, does not beat its worst finished one. True when every row is done."""
        for b, score in enumerate(best_live):
            if not self.done[b] and len(self.rows[b]) == self.k:
                worst = min(finished for finished, _ in self.rows[b])
                self.done[b] = self.normalise(score, length) <= worst
        return all(self.done)

    def add_live(self, tokens: Tensor, beam_scores: Tensor, max_len: int) -> None:
        """max_len reached: live hypotheses of unfinished rows compete without an EOS."""
        batch = len(self.rows)
        live = tokens[:, 1:].view(batch, self.k, max_len).tolist()
        scores = beam_scores.tolist()
        for b in range(batch):
            if not self.done[b]:
                for j in range(self.k):
                    if scores[b][j] != float("-inf"):
                        self.offer(b, self.normalise(scores[b][j], max_len), live[b][j])

    def best(self, eos_id: int) -> list[list[int]]:
        """The best finished hypothesis of each row (max() keeps the first of equal scores)."""
        return [_strip(max(hyps, key=lambda h: h[0])[1] if hyps else [], eos_id) for hyps in self.rows]


def decode_batch(model: nn.Module, src: Tensor, bos_id: int, eos_id: int, beam_size: int, max_len: int,
                 length_penalty: float = 1.0) -> list[list[int]]:
    """Output ids for each source row: a model's own ``generate_ids`` (a Hugging Face model's
    ``generate``) when it has one, else beam search (``beam_size`` > 1) or greedy decoding."""
    if hasattr(model, "generate_ids"):
        return model.generate_ids(src, bos_id, eos_id, beam_size, max_len, length_penalty)
    if beam_size > 1:
        return beam_search(model, src, bos_id, eos_id, beam_size, max_len, length_penalty)
    return greedy_decode(model, src, bos_id, eos_id, max_len)

