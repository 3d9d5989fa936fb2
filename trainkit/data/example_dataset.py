"""An example of a user's own ``torch.utils.data.Dataset`` for ``data=dataset``: the shipped 8x8
digits, one sample per ``__getitem__``, written as a user would write it (nothing from
trainkit is imported). ``+experiment=dataset_digits`` trains it; copy it as a start for yours.

It ships inside the package (not in docs/examples) so that the preset runs from an installed
wheel without ``PYTHONPATH``, and a checkpoint of it evaluates without ``trust=[...]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class DigitsDataset(Dataset):
    """One split of the digits: ``(pixels, label)`` with 64 float pixels in [0, 1] and an
    integer label 0-9. ``split`` is "train", "val" or "test" (trainkit passes the split it
    builds when the config does not set it); ``path``: an ``.npz`` with ``x``, ``y``, ``split``."""

    def __init__(self, split: str = "train", path: str | None = None):
        file = Path(path) if path else Path(__file__).parent / "files" / "digits.npz"
        arrays = np.load(file)
        rows = arrays["split"] == SPLIT_CODES[split]
        self.pixels = torch.as_tensor(arrays["x"][rows], dtype=torch.float32) / 16.0  # intensities are 0..16
        self.labels = torch.as_tensor(arrays["y"][rows], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pixels[index], self.labels[index]

    def runtime_kwargs(self) -> dict[str, int]:
        """Sizes the model, loss and task take when their config does not set them."""
        return {"in_features": self.pixels.shape[1], "out_features": 10, "num_classes": 10}
