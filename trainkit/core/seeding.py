"""Seeds: one call seeds every global RNG; each rank's seed is derived from the run's."""

from __future__ import annotations

import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's global RNGs: ``seed`` itself on rank 0 (a one-process run is
    unchanged), a value mixed from (seed, rank) elsewhere, so ranks draw different dropout
    masks and augmentations. Data order does not come from these RNGs (the batch plans have
    their own generators seeded by ``seed``), and DDP copies rank 0's initial weights."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
