"""Dataset classes for tests/test_dataset.py, named by ``_target_`` as a user's would be
(``data.train._target_=dataset_helpers.Blobs``): tests/ is on the path of pytest and of the
``cli`` fixture's subprocesses."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset, default_collate

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


class PlainBlobs(Dataset):
    """``size`` samples of ``features`` floats around one of ``classes`` fixed centres, as
    ``(x, y)``; each split draws its own samples (the centres are shared). No runtime_kwargs."""

    def __init__(self, size: int = 96, features: int = 8, classes: int = 3, split: str = "train"):
        centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(123)) * 3
        generator = torch.Generator().manual_seed(SPLIT_SEEDS[split])
        self.y = torch.randint(classes, (size,), generator=generator)
        self.x = centres[self.y] + torch.randn(size, features, generator=generator)
        self.split, self.classes = split, classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Blobs(PlainBlobs):
    """``PlainBlobs`` that tells the model its sizes."""

    def runtime_kwargs(self) -> dict[str, Any]:
        return {"in_features": self.x.shape[1], "out_features": self.classes, "num_classes": self.classes}


class BadRuntime(PlainBlobs):
    def runtime_kwargs(self) -> Any:
        return [("in_features", 8)]


class Stream(IterableDataset):
    def __iter__(self):
        yield from ((torch.zeros(8), torch.tensor(0)) for _ in range(4))


class NoLength:
    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(8), torch.tensor(0)


def scaled_collate(samples: list[Any], scale: float = 1.0) -> list[torch.Tensor]:
    """torch's default batch with the inputs multiplied by ``scale``."""
    inputs, targets = default_collate(samples)
    return [inputs * scale, targets]


class ScaledCollate:
    """``scaled_collate`` as a class, built with its arguments."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, samples: list[Any]) -> list[torch.Tensor]:
        return scaled_collate(samples, self.scale)
