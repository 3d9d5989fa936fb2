"""Write the shipped data sets into the package (run once; needs scikit-learn).

- ``digits.npz``: the 8x8 handwritten digits (1,797 images, the UCI optical recognition
  set as scikit-learn ships it), pixels 0..16 as uint8, with fixed stratified
  train/val/test splits (70/15/15).
- ``diabetes.npz``: scikit-learn's diabetes regression set (442 rows, 10 features),
  features and target as float32, same kind of splits (random, not stratified).
- ``breast_cancer.csv`` (for ``+experiment=table_mlp``): the Breast Cancer Wisconsin
  (Diagnostic) set as scikit-learn ships it (569 rows, 30 real-valued features of cell nuclei,
  target ``diagnosis``: benign or malignant; W. Wolberg, W. Street, O. Mangasarian, UCI Machine
  Learning Repository). Feature names have their spaces replaced by underscores
  (``mean radius`` -> ``mean_radius``) so they can be named on a command line; values keep 6
  significant digits; a ``split`` column holds train/val/test (stratified), which
  ``data=table`` uses as is.

    pip install scikit-learn
    python scripts/make_digits.py [--out trainkit/data/files] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import numpy as np


def split_indices(labels: np.ndarray, seed: int, stratify: bool) -> np.ndarray:
    """0 = train, 1 = val, 2 = test for every row; 70/15/15, stratified by label if asked."""
    rng = np.random.default_rng(seed)
    split = np.zeros(len(labels), dtype=np.uint8)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratify else [
        np.arange(len(labels))
    ]
    for rows in groups:
        rows = rng.permutation(rows)
        n_val = round(0.15 * len(rows))
        split[rows[:n_val]] = 1
        split[rows[n_val : 2 * n_val]] = 2
    return split


def main() -> None:
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "trainkit/data/files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    x = digits.data.astype(np.uint8)
    y = digits.target.astype(np.int64)
    np.savez_compressed(args.out / "digits.npz", x=x, y=y, split=split_indices(y, args.seed, True))

    diabetes = load_diabetes(scaled=True)
    x = diabetes.data.astype(np.float32)
    y = diabetes.target.astype(np.float32)
    split = split_indices(np.zeros(len(y)), args.seed, False)
    np.savez_compressed(args.out / "diabetes.npz", x=x, y=y, split=split)
    write_table(load_breast_cancer(), args.out / "breast_cancer.csv", args.seed)
    for name in ("digits.npz", "diabetes.npz", "breast_cancer.csv"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size} bytes)")



def write_table(table: Any, path: Path, seed: int) -> None:
    """A scikit-learn classification set as a CSV with a ``split`` column (train/val/test)."""
    columns = [name.replace(" ", "_") for name in table.feature_names]
    diagnosis = [str(table.target_names[label]) for label in table.target]
    names = np.array(["train", "val", "test"])[split_indices(table.target, seed, True)]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*columns, "diagnosis", "split"])
        for features, label, split in zip(table.data, diagnosis, names):
            writer.writerow([*(f"{value:.6g}" for value in features), label, split])


if __name__ == "__main__":
    main()
