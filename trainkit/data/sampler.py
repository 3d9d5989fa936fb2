"""Batch plans: every batch of an epoch as a pure function of (seed, epoch), sharded by rank.

Exact resume depends on this module: a run restarted at micro-batch ``b`` of epoch ``e``
rebuilds the same plan and starts at index ``b``. It never replays batches and never
draws from the global RNG (a private generator seeded by (seed, epoch) shuffles).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger("trainkit")


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A private generator for one epoch; the global RNG stays untouched."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class BatchPlan(Sampler[list[int]]):
    """Yields lists of sample indices, one per micro-batch, for this rank.

    ``even=True`` (training) drops the last few batches so every rank takes the same
    number of steps; ``even=False`` (evaluation) gives every batch to exactly one rank, so
    distributed metrics cover each sample once. ``set_epoch(epoch, start)`` picks the
    epoch and skips the first ``start`` batches of this rank's share.
    """

    def __init__(self, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, even: bool = True):
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.even = rank, world_size, even
        self.epoch, self.start = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch, for all ranks."""
        raise NotImplementedError

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def shard(self, epoch: int) -> list[list[int]]:
        batches = self.batches(epoch)
        if self.even:
            batches = batches[: len(batches) - len(batches) % self.world_size]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.shard(self.epoch)[self.start :]

    def __len__(self) -> int:
        """Batches of this rank in the whole current epoch (the resume offset not deducted)."""
        return len(self.shard(self.epoch))


class FixedBatches(BatchPlan):
    """Batches of ``batch_size`` samples from a (seeded) permutation; the last may be smaller."""

    def __init__(self, num_samples: int, batch_size: int, drop_last: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_samples, self.batch_size, self.drop_last = num_samples, batch_size, drop_last

    def batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch))
        else:
            order = torch.arange(self.num_samples)
        chunks = [c.tolist() for c in order.split(self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        return chunks


class TokenBatches(BatchPlan):
    """Length-bucketed batches holding at most ``max_tokens`` padded tokens each.

    Samples are sorted by length (ties broken by a seeded random key, so bucket contents
    change every epoch), cut greedily into batches under the budget, and the batch order
    is shuffled. Sorting keeps padding small; ``lengths`` is the padded size a sample
    needs (for translation: max of source and target length).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.max_tokens = max_tokens
        too_long = int(self.lengths.max()) if len(self.lengths) else 0
        if too_long > max_tokens:
            raise ValueError(f"max_tokens={max_tokens} is smaller than the longest sample ({too_long} tokens)")

    def batches(self, epoch: int) -> list[list[int]]:
        n = len(self.lengths)
        if self.shuffle:
            generator = epoch_generator(self.seed, epoch)
            tie_break = torch.randperm(n, generator=generator)
        else:
            generator, tie_break = None, torch.arange(n)
        # Sort by length, then by the random key: a stable two-pass sort.
        order = tie_break[torch.sort(self.lengths[tie_break], stable=True).indices].tolist()
        batches, current, longest = [], [], 0
        for index in order:
            length = int(self.lengths[index])
            if current and max(longest, length) * (len(current) + 1) > self.max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        if generator is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches


def set_epoch(loader: Iterable, epoch: int, start: int) -> None:
    """Point a resumable batch plan at (epoch, first batch); a sampler with a one-argument
    ``set_epoch`` (``DistributedSampler``) is reshuffled for the epoch, which then restarts.

    The plan may sit on the loader's batch sampler (trainkit's own plans), on the sampler
    inside a ``BatchSampler`` (a user's ``DataLoader(sampler=DistributedSampler(...))``), or on
    the loader's sampler; the first one found with ``set_epoch`` is used.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    candidates = (batch_sampler, getattr(batch_sampler, "sampler", None), getattr(loader, "sampler", None))
    plan = next((c for c in candidates if c is not None and hasattr(c, "set_epoch")), None)
    if plan is None:
        if start:
            log.warning("resuming mid-epoch with a loader that cannot skip batches: the epoch restarts")
        return
    try:
        plan.set_epoch(epoch, start)
    except TypeError:
        plan.set_epoch(epoch)  # a DistributedSampler: exact only at epoch boundaries
        if start:
            log.warning("resuming mid-epoch with a sampler that cannot skip batches: epoch %d restarts", epoch)


@dataclass
class SplitLoading:
    """How every data set turns one split into a loader: a batch plan (seeded, sharded by rank,
    shuffled for training only; evaluation plans give each batch to one rank, so every sample
    is evaluated once) and a DataLoader (``data.num_workers``, ``data.pin_memory``)."""

    batch_size: int = 64
    shuffle: bool = True
    num_workers: int = 0
    pin_memory: bool | None = False  # None (the configs' null): on when training on CUDA (run.build)
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def plan_options(self, split: str) -> dict[str, Any]:
        """The keyword arguments of a ``BatchPlan`` for ``split``."""
        training = split == "train"
        return dict(seed=self.seed, shuffle=self.shuffle and training, rank=self.rank,
                    world_size=self.world_size, even=training)

    def fixed(self, dataset: Any, split: str, drop_last: bool = False,
              collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        """``batch_size`` samples per batch (``drop_last`` drops a short last training batch)."""
        plan = FixedBatches(len(dataset), self.batch_size, drop_last=drop_last and split == "train",
                            **self.plan_options(split))
        return self.loader(dataset, plan, collate_fn)

    def budgeted(self, dataset: Any, split: str, max_tokens: int | None) -> DataLoader:
        """At most ``max_tokens`` padded tokens per batch, samples of similar ``dataset.lengths()``
        together (``TokenBatches``); ``batch_size`` samples per batch when ``max_tokens`` is None."""
        if max_tokens is None:
            return self.fixed(dataset, split)
        return self.loader(dataset, TokenBatches(dataset.lengths(), max_tokens, **self.plan_options(split)))

    def loader(self, dataset: Any, plan: BatchPlan, collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
        """A DataLoader in the order of ``plan``. Without ``collate_fn`` the dataset takes a whole
        index list and returns the batch (one indexing call per batch); with one, the dataset
        returns one sample per index and ``collate_fn`` makes the batch. A private generator
        keeps DataLoader's worker seeding off the global RNG."""
        common = dict(generator=torch.Generator(), num_workers=self.num_workers, pin_memory=bool(self.pin_memory),
                      persistent_workers=self.num_workers > 0)
        if collate_fn is None:
            return DataLoader(dataset, sampler=plan, batch_size=None, **common)
        return DataLoader(dataset, batch_sampler=plan, collate_fn=collate_fn, **common)
