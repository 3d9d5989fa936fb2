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

import torch
from torch import Tensor

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
    device = src.device

    def normalise(score: float, length: int) -> float:
        return score / (length**length_penalty)

    # finished[b]: up to k (normalised score, tokens without BOS/EOS) pairs.
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]

    def offer(b: int, score: float, hyp: list[int]) -> None:
        hyps = finished[b]
        if len(hyps) < k:
            hyps.append((score, hyp))
            return
        worst = min(range(k), key=lambda i: hyps[i][0])
        if score > hyps[worst][0]:
            hyps[worst] = (score, hyp)

    with eval_mode(model):
        memory, src_pad_mask = model.encode(src)
        # Each source row is repeated once per beam: rows b*k .. b*k+k-1 belong to source b.
        # Only the first decode call reads these; afterwards the cache holds its own copies.
        memory = memory.repeat_interleave(k, dim=0)
        src_pad_mask = src_pad_mask.repeat_interleave(k, dim=0)
        cache = model.new_cache()

        tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
        # All beams start from the same BOS; only beam 0 is live at first, otherwise the
        # first step would fill the beam with k copies of the same extensions.
        beam_scores = torch.full((batch, k), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0
        done = [False] * batch
        row_offset = torch.arange(batch, device=device).unsqueeze(1) * k  # [B, 1]

        for step in range(max_len):
            logits = model.decode(tokens[:, -1:], memory, src_pad_mask, cache)[:, -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B*k, V]
            vocab = log_probs.size(-1)
            candidates = (beam_scores.view(-1, 1) + log_probs).view(batch, k * vocab)
            n_cand = min(2 * k, k * vocab)
            top_scores, top_index = candidates.topk(n_cand, dim=1)  # sorted, best first
            top_beam = top_index // vocab
            top_token = top_index % vocab
            is_eos = top_token.eq(eos_id)
            length = step + 1

            # EOS extensions ranked within the first k candidates finish a hypothesis.
            # (Lower-ranked ones are ignored; with k=1 that is what makes this greedy.)
            eos_hits = (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist()
            for b, j in eos_hits:
                if not done[b]:
                    prefix = tokens[b * k + int(top_beam[b, j]), 1:].tolist()
                    offer(b, normalise(top_scores[b, j].item(), length), prefix)

            # The k best non-EOS extensions stay live: sort EOS behind, keep candidate rank
            # (so beam 0 is always the best live hypothesis).
            rank = torch.arange(n_cand, device=device).expand(batch, n_cand)
            order = (rank + is_eos.long() * n_cand).argsort(dim=1)[:, :k]
            beam_scores = top_scores.gather(1, order)
            parent = (row_offset + top_beam.gather(1, order)).view(-1)
            tokens = torch.cat(
                [tokens.index_select(0, parent), top_token.gather(1, order).view(-1, 1)], dim=1
            )

            best_live = beam_scores[:, 0].tolist()
            for b in range(batch):
                if not done[b] and len(finished[b]) == k:
                    worst = min(score for score, _ in finished[b])
                    done[b] = normalise(best_live[b], length) <= worst
            if all(done):
                break
            cache.reorder(parent)
        else:
            # max_len reached: live hypotheses of unfinished rows compete without an EOS.
            live = tokens[:, 1:].view(batch, k, max_len).tolist()
            scores = beam_scores.tolist()
            for b in range(batch):
                if not done[b]:
                    for j in range(k):
                        if scores[b][j] != float("-inf"):
                            offer(b, normalise(scores[b][j], max_len), live[b][j])

    results = []
    for hyps in finished:
        # max() keeps the first of equal scores.
        best = max(hyps, key=lambda h: h[0])[1] if hyps else []
        results.append(_strip(best, eos_id))
    return results
