"""Small in-memory array data sets shipped with trainkit (digits, diabetes) or a user's .npz.

An ``.npz`` holds ``x`` (features), ``y`` (labels or targets) and ``split`` (0 train,
1 val, 2 test per row). Batches are fetched with one indexing call per batch, not one per
sample, so the data loader adds next to nothing to a step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainkit.core.errors import ConfigError
from trainkit.data.sampler import SplitLoading

FILES = Path(__file__).parent / "files"
SPLITS = {"train": 0, "val": 1, "test": 2}


class TensorBatches(Dataset):
    """Tensors indexed by a whole list of rows at once (the sampler yields index lists)."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(rows)
        return tuple(t.index_select(0, index) for t in self.tensors)


class ArrayData:
    """Features and labels from an ``.npz`` file with fixed train/val/test splits.

    ``name`` picks a shipped set (``digits``: 1,797 8x8 images, pixels scaled to [0, 1];
    ``diabetes``: 442 rows, regression target standardised with the training split's
    mean and std); ``path`` reads a user's own file instead.
    """

    def __init__(self, name: str = "digits", path: str | None = None, batch_size: int = 64,
                 shuffle: bool = True, num_workers: int = 0, pin_memory: bool | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        file = Path(path) if path else FILES / f"{name}.npz"
        try:
            arrays = np.load(file)
            x, y, split = arrays["x"], arrays["y"], arrays["split"]
        except (OSError, KeyError, ValueError) as error:
            raise ConfigError(f"data: cannot read {file}: {error} (an .npz with x, y and split is expected)") from None
        self.classification = np.issubdtype(y.dtype, np.integer)
        features = torch.as_tensor(x, dtype=torch.float32)
        if name == "digits" and path is None:
            features = features / 16.0  # pixel intensities are 0..16
        if self.classification:
            targets = torch.as_tensor(y, dtype=torch.long)
        else:
            targets = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
            train = targets[torch.as_tensor(split == SPLITS["train"])]
            targets = (targets - train.mean(0)) / train.std(0)
        self.splits = {
            name: TensorBatches(features[mask], targets[mask])
            for name, code in SPLITS.items()
            if (mask := torch.as_tensor(split == code)).any()
        }
        if "train" not in self.splits:
            raise ConfigError(f"data: {file} has no training rows (split == 0)")
        self.num_features = features[0].numel()
        self.num_outputs = int(targets.max()) + 1 if self.classification else targets.shape[1]
        self.loading = SplitLoading(batch_size, shuffle, num_workers, pin_memory, seed, rank, world_size)

    def runtime_kwargs(self) -> dict:
        """What models, losses and tasks may need to know about this data."""
        kwargs = {"in_features": self.num_features, "out_features": self.num_outputs}
        if self.classification:
            kwargs["num_classes"] = self.num_outputs
        return kwargs

    def loader(self, split: str) -> DataLoader | None:
        """A loader over one split (None if the data has no such split)."""
        dataset = self.splits.get(split)
        return self.loading.fixed(dataset, split) if dataset is not None else None
