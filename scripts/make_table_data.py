"""Write the shipped table for ``+experiment=table_mlp`` (run once; needs scikit-learn).

``breast_cancer.csv``: the Breast Cancer Wisconsin (Diagnostic) set as scikit-learn ships it
(569 rows, 30 real-valued features of cell nuclei, target ``diagnosis``: benign or malignant;
W. Wolberg, W. Street, O. Mangasarian, UCI Machine Learning Repository). Feature names have
their spaces replaced by underscores (``mean radius`` -> ``mean_radius``) so they can be
named on a command line; values keep 6 significant digits. A ``split`` column holds
train/val/test (70/15/15, stratified by diagnosis, seeded), which ``data=table`` uses as is.

    pip install scikit-learn
    python scripts/make_table_data.py [--out trainkit/data/files] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def splits(labels: np.ndarray, seed: int) -> list[str]:
    """train/val/test for every row: 70/15/15 within each class."""
    rng = np.random.default_rng(seed)
    names = np.full(len(labels), "train", dtype=object)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        held = round(0.15 * len(rows))
        names[rows[:held]] = "val"
        names[rows[held : 2 * held]] = "test"
    return names.tolist()


def main() -> None:
    from sklearn.datasets import load_breast_cancer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "trainkit/data/files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    table = load_breast_cancer()
    columns = [name.replace(" ", "_") for name in table.feature_names]
    diagnosis = [str(table.target_names[label]) for label in table.target]
    with open(args.out / "breast_cancer.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*columns, "diagnosis", "split"])
        for features, label, split in zip(table.data, diagnosis, splits(table.target, args.seed)):
            writer.writerow([*(f"{value:.6g}" for value in features), label, split])
    print(f"wrote {args.out / 'breast_cancer.csv'}: {len(diagnosis)} rows, {len(columns)} features")


if __name__ == "__main__":
    main()
