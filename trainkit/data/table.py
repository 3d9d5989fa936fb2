"""A user's own table (``data=table``): features and a target from CSV, TSV, Parquet, JSONL or
Feather files, read with pyarrow.

Splits: ``train_path`` with ``valid_path``/``test_path``; or one file divided by its ``split``
column (values ``train``, ``val``, ``test``); or rows of ``train_path`` held out by
``val_fraction``/``test_fraction``, drawn with the run's seed. Everything learned (categorical
codes, the numeric features' mean and std, the class names in sorted order) comes from the
training rows only and is kept in ``state_dict()``; a checkpoint gives it back through
``data_state``, so evaluation encodes new rows exactly as training did. Categorical columns
become one-hot blocks of their codes, with one more code for values the training rows never
held. Classification or regression follows the target's type (strings, booleans, integers:
class labels; floats: numbers) unless ``task`` names a classification or regression task.

Batches come from ``trainkit.data.arrays``' loader and batch plans (exact mid-epoch resume,
exact DDP sharding). Never: learn from validation or test rows, or pass a missing value, a
non-numeric feature or an unknown label on silently; each is a ``ConfigError`` naming the file,
the column and the first bad row (1-based, counting data rows without a header).
pyarrow is imported when a table is read, not when trainkit starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.data.arrays import FILES, TensorBatches
from trainkit.data.sampler import SplitLoading

SPLIT_COLUMN = "split"
SPLITS = ("train", "val", "test")
DEFAULT_VAL_FRACTION = 0.2  # held out when no other validation split is given
FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".feather": "feather", ".arrow": "feather"}


@dataclass
class Part:
    """Rows of one split: a pyarrow table, the file and key it came from, and each row's
    1-based data row number in that file (for messages)."""

    file: str
    key: str
    table: Any
    rows: np.ndarray

    def take(self, index: np.ndarray) -> Part:
        return Part(self.file, self.key, self.table.take(index), self.rows[index])

    def where(self, column: str, position: int) -> str:
        return f"data.{self.key}={self.file}: column {column!r}, row {self.rows[position]}"


def read_table(path: str, key: str) -> Part:
    """A whole file as one part; ``ConfigError`` naming the key and file if it cannot be read."""
    import pyarrow as pa

    file = Path(path)
    if file.is_dir():
        return Part(str(path), key, *saved_dataset(file, key))
    kind = FORMATS.get(file.suffix.lower())
    if kind is None:
        raise ConfigError(f"data.{key}={path}: unknown file type {file.suffix or '(none)'!r}; "
                          f"use one of {', '.join(FORMATS)}")
    if not file.is_file():
        raise ConfigError(f"data.{key}={path}: no such file")
    try:
        table = read_format(file, kind)
    except (OSError, ValueError, pa.ArrowException) as error:
        text = " ".join(str(error).split())[:300]
        raise ConfigError(f"data.{key}={path}: cannot be read as {kind}: {text}") from None
    if table.num_rows == 0:
        raise ConfigError(f"data.{key}={path}: the table has no rows")
    return Part(str(path), key, table, np.arange(1, table.num_rows + 1))


def saved_dataset(folder: Path, key: str) -> tuple[Any, np.ndarray]:
    """(pyarrow table, row numbers) of a folder written by ``datasets``' ``save_to_disk``. A
    ``DatasetDict`` becomes one table with a ``split`` column (its ``validation`` split as
    ``val``), so it divides as a file with that column does."""
    import pyarrow as pa

    if not (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file():
        raise ConfigError(f"data.{key}={folder}: a folder, but not one saved by the datasets library "
                          "(no state.json or dataset_dict.json)")
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.{key}={folder}: reading a saved dataset needs the datasets package: "
                          'pip install "trainkit[hf]"') from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError, FileNotFoundError) as error:
        raise ConfigError(f"data.{key}={folder}: cannot be read as a saved dataset: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
        unknown = [name for name in loaded if name not in names]
        if unknown:
            raise ConfigError(f"data.{key}={folder}: its split {unknown[0]!r} is not train, validation or test")
        tables = [loaded[name].data.table.append_column(SPLIT_COLUMN, pa.array([names[name]] * loaded[name].num_rows))
                  for name in loaded]
        table = pa.concat_tables(tables)
        rows = np.concatenate([np.arange(1, loaded[name].num_rows + 1) for name in loaded])
    else:
        table = loaded.data.table
        rows = np.arange(1, table.num_rows + 1)
    if table.num_rows == 0:
        raise ConfigError(f"data.{key}={folder}: the dataset has no rows")
    return table, rows


def read_format(file: Path, kind: str) -> Any:
    """A pyarrow table; CSV/TSV empty cells and NA-like strings are missing values."""
    if kind in ("csv", "tsv"):
        from pyarrow import csv

        return csv.read_csv(file, parse_options=csv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
                            convert_options=csv.ConvertOptions(strings_can_be_null=True))
    if kind == "jsonl":
        from pyarrow import json

        return json.read_json(file)
    if kind == "parquet":
        import pyarrow.parquet as parquet

        return parquet.read_table(file)
    import pyarrow.feather as feather

    return feather.read_table(file)


def shipped(name: str | None) -> str:
    """The path of a table shipped in ``trainkit/data/files`` (``data.name``)."""
    tables = sorted(p.stem for p in FILES.glob("*.csv"))
    if name is None:
        raise ConfigError("data.train_path: required (a CSV, TSV, Parquet, JSONL or Feather file)")
    if name not in tables:
        raise ConfigError(f"data.name={name!r}: no shipped table of that name (shipped: {', '.join(tables)}); "
                          "for your own file use data.train_path=FILE")
    return str(FILES / f"{name}.csv")


def split_parts(train_path: str, valid_path: str | None, test_path: str | None, val_fraction: float | None,
                test_fraction: float | None, seed: int) -> dict[str, Part]:
    """The rows of each split (``train`` always; ``val``, ``test`` when given or held out)."""
    for key, path, fraction in (("val", valid_path, val_fraction), ("test", test_path, test_fraction)):
        if path is not None and fraction is not None:
            raise ConfigError(f"data.{key}_fraction={fraction}: the {key} split is data.{'valid' if key == 'val' else key}"
                              f"_path={path} already; set only one of them")
    train = read_table(train_path, "train_path")
    if SPLIT_COLUMN in train.table.column_names:
        parts = by_column_and_fraction(train, valid_path, test_path, val_fraction, test_fraction, seed)
    else:
        if val_fraction is None and valid_path is None:
            val_fraction = DEFAULT_VAL_FRACTION
        parts = by_fraction(train, val_fraction or 0.0, test_fraction or 0.0, seed)
    for split, key, path in (("val", "valid_path", valid_path), ("test", "test_path", test_path)):
        if path is not None:
            parts[split] = read_table(path, key)
    return parts


def by_column_and_fraction(train: Part, valid_path: str | None, test_path: str | None, val_fraction: float | None,
                           test_fraction: float | None, seed: int) -> dict[str, Part]:
    """Rows divided by the ``split`` column; a split the column does not hold may come from a
    fraction of its training rows (a saved ``DatasetDict`` with train and test only) or a file."""
    parts = by_column(train)
    given = {"valid_path": ("val", valid_path), "val_fraction": ("val", val_fraction),
             "test_path": ("test", test_path), "test_fraction": ("test", test_fraction)}
    for key, (split, value) in given.items():
        if value is not None and split in parts:
            raise ConfigError(f"data.{key}: the {SPLIT_COLUMN!r} column of {train.file} gives the {split} rows "
                              f"already; remove data.{key}")
    if val_fraction or test_fraction:
        parts.update(by_fraction(parts["train"], val_fraction or 0.0, test_fraction or 0.0, seed))
    return parts


def by_column(part: Part) -> dict[str, Part]:
    """Rows divided by the ``split`` column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pc.cast(part.table.column(SPLIT_COLUMN), pa.string()).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~np.isin(names, SPLITS))
    if len(bad):
        raise ConfigError(f"{part.where(SPLIT_COLUMN, bad[0])} holds {names[bad[0]]!r}; "
                          f"its values must be one of {', '.join(SPLITS)}")
    parts = {split: part.take(np.flatnonzero(names == split)) for split in SPLITS if (names == split).any()}
    if "train" not in parts:
        raise ConfigError(f"data.train_path={part.file}: no row has {SPLIT_COLUMN} == train")
    return parts


def by_fraction(part: Part, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Part]:
    """Validation and test rows drawn from one file by a permutation seeded with the run's seed;
    each split keeps the file's row order."""
    rows = part.table.num_rows
    counts = {}
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not 0 <= fraction < 1:
            raise ConfigError(f"data.{split}_fraction={fraction}: must be at least 0 and below 1")
        counts[split] = round(rows * fraction)
        if fraction > 0 and counts[split] == 0:
            raise ConfigError(f"data.{split}_fraction={fraction} of the {rows} rows of {part.file} is no row; "
                              "raise it, or set it to 0")
    if counts["val"] + counts["test"] >= rows:
        raise ConfigError(f"data.val_fraction + data.test_fraction leave no training row of the {rows} in {part.file}")
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).numpy()
    held = counts["val"] + counts["test"]
    chosen = {"train": order[held:], "val": order[: counts["val"]], "test": order[counts["val"] : held]}
    return {split: part.take(np.sort(index)) for split, index in chosen.items() if len(index)}


def choose_features(parts: dict[str, Part], target: str, features: list[str] | None,
                    categorical: list[str]) -> list[str]:
    """The feature columns; every part must hold them and the target, with no missing value."""
    columns = parts["train"].table.column_names
    chosen = [c for c in columns if c not in (target, SPLIT_COLUMN)] if features is None else list(features)
    if not chosen:
        raise ConfigError(f"data.features: {parts['train'].file} has no column besides the target {target!r}")
    if target in chosen:
        raise ConfigError(f"data.features: lists the target {target!r}; a model must not see what it predicts")
    for name in categorical:
        if name not in chosen:
            raise ConfigError(f"data.categorical: {name!r} is not one of the features{did_you_mean(name, chosen)}")
    for part in parts.values():
        names = part.table.column_names
        for key, column in (("target", target), *(("features", c) for c in chosen)):
            if column not in names:
                raise ConfigError(f"data.{key}: {part.file} has no column {column!r}{did_you_mean(column, names)} "
                                  f"(its columns: {', '.join(names[:30])})")
        check_complete(part, [target, *chosen])
    return chosen


def check_complete(part: Part, columns: list[str]) -> None:
    """No null (empty cell, NA, null) and no NaN in the used columns."""
    import pyarrow.compute as pc

    for column in columns:
        first = pc.index(pc.is_null(part.table.column(column), nan_is_null=True), True).as_py()
        if first >= 0:
            raise ConfigError(f"{part.where(column, first)}: a missing value; fill it in or drop the row")


def plain(array: Any) -> Any:
    """A column with dictionary encoding (pandas categoricals in Parquet) decoded."""
    import pyarrow as pa

    return array.cast(array.type.value_type) if pa.types.is_dictionary(array.type) else array


def is_numeric(kind: Any) -> bool:
    import pyarrow as pa

    return any(check(kind) for check in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                         pa.types.is_decimal))


def numbers(part: Part, column: str, advice: str) -> np.ndarray:
    """A numeric column as float64 (text columns too, where every value reads as a number);
    otherwise a ``ConfigError`` naming the first value that is not a number."""
    import pyarrow as pa

    array = plain(part.table.column(column))
    if is_numeric(array.type):
        return array.cast(pa.float64()).to_numpy()
    values = array.to_pylist()
    position = next((i for i, value in enumerate(values) if not looks_numeric(value)), None)
    if position is None:  # text that reads as numbers everywhere in these rows (JSON "4")
        return np.array([float(value) for value in values])
    raise ConfigError(f"{part.where(column, position)} holds {values[position]!r}: the column is not numeric "
                      f"({array.type}); {advice}")


def feature_advice(column: str) -> str:
    return f"fix the value, list the column in data.categorical=[{column}], or leave it out of data.features"


def looks_numeric(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def strings(part: Part, column: str) -> Any:
    import pyarrow as pa

    return plain(part.table.column(column)).cast(pa.string())


def codes_of(part: Part, column: str, values: list[str]) -> np.ndarray:
    """The index of each row's value in ``values``; -1 where it is not there."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found = pc.index_in(strings(part, column), value_set=pa.array(values, pa.string()))
    return found.fill_null(-1).to_numpy().astype(np.int64)


def target_kind(task: str, part: Part, target: str) -> str:
    """classification or regression: from the task's name when it says, else the target's type."""
    import pyarrow as pa

    name = str(task).rsplit(".", 1)[-1].lower()
    for kind in ("classification", "regression"):
        if kind in name:
            return kind
    kind = plain(part.table.column(target)).type
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "regression"
    if is_numeric(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "classification"
    raise ConfigError(f"data.target={target!r}: column of {part.file} holds {kind}, neither labels nor numbers; "
                      "pick another target column")


@dataclass
class Encoding:
    """What the training rows teach: the feature columns, each categorical column's values (its
    codes are their positions; one more code for unseen values), each numeric column's
    ``[mean, std]``, and the class names (sorted by value) of a classification target."""

    target: str
    kind: str
    features: list[str]
    categories: dict[str, list[str]]
    scale: dict[str, list[float]]
    classes: list[str] | None

    @classmethod
    def learn(cls, train: Part, target: str, features: list[str], categorical: list[str], standardize: bool,
              task: str) -> Encoding:
        import pyarrow.compute as pc

        categories = {c: sorted(pc.unique(strings(train, c)).to_pylist()) for c in categorical}
        scale = {}
        for column in (c for c in features if c not in categories):
            values = numbers(train, column, feature_advice(column))
            std = float(values.std()) if standardize else 1.0
            scale[column] = [float(values.mean()) if standardize else 0.0, std if std > 0 else 1.0]
        kind = target_kind(task, train, target)
        return cls(target, kind, list(features), categories, scale,
                   learn_classes(train, target) if kind == "classification" else None)

    def width(self) -> int:
        return sum(len(self.categories[c]) + 1 if c in self.categories else 1 for c in self.features)

    def encode(self, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
        """(features float32 [rows, width], targets: class ids int64 [rows] or float32 [rows, 1])."""
        blocks = []
        for column in self.features:
            if column in self.categories:
                codes = codes_of(part, column, self.categories[column])
                unseen = len(self.categories[column])
                blocks.append(np.eye(unseen + 1, dtype=np.float32)[np.where(codes < 0, unseen, codes)])
            else:
                mean, std = self.scale[column]
                values = numbers(part, column, feature_advice(column))
                blocks.append(((values - mean) / std).astype(np.float32)[:, None])
        return torch.from_numpy(np.concatenate(blocks, axis=1)), self.targets(part)

    def targets(self, part: Part) -> torch.Tensor:
        return target_values(part, self.target, self.classes)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Encoding:
        try:
            return cls(**state)
        except TypeError as error:
            raise ConfigError(f"data: the checkpoint's table state does not fit this trainkit: {error}") from None


def target_values(part: Part, target: str, classes: list[str] | None) -> torch.Tensor:
    """Class ids (int64 [rows]) of the names in ``classes``, or numbers (float32 [rows, 1]) when
    ``classes`` is None; a label no training row had is a ``ConfigError``."""
    if classes is None:
        values = numbers(part, target, "a regression target must be numbers (or use task=classification)")
        return torch.from_numpy(values.astype(np.float32)[:, None])
    codes = codes_of(part, target, classes)
    unknown = np.flatnonzero(codes < 0)
    if len(unknown):
        value = strings(part, target)[int(unknown[0])].as_py()
        raise ConfigError(f"{part.where(target, unknown[0])} holds the label {value!r}, which no training "
                          f"row has (classes: {', '.join(classes[:20])})")
    return torch.from_numpy(codes)


def learn_classes(train: Part, target: str) -> list[str]:
    """Class names sorted by value (numbers numerically); at least two; floats must be whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = plain(train.table.column(target))
    if pa.types.is_floating(column.type):
        fractional = np.flatnonzero(np.modf(column.to_numpy())[0] != 0)
        if len(fractional):
            raise ConfigError(f"{train.where(target, fractional[0])} holds {column[int(fractional[0])].as_py()}: "
                              "class labels must be names or whole numbers; for real-valued targets use "
                              "task=auto (or task=regression loss=mse)")
    values = pc.unique(column)
    names = values.take(pc.array_sort_indices(values)).cast(pa.string()).to_pylist()
    if len(names) < 2:
        raise ConfigError(f"data.target={target!r}: the training rows of {train.file} hold one class "
                          f"({names[0]!r}); a classifier needs two or more")
    return names


class TableData:
    """Features and a target from a user's table files; see the module docstring for the contract.

    ``name`` picks a table shipped with trainkit (``breast_cancer``) when ``train_path`` is null.
    ``task`` is the chosen task's ``_target_`` (``conf/data/table.yaml`` fills it in): a name
    containing ``classification`` or ``regression`` decides how the target is read; anything
    else (``task=auto``) follows the target's type. ``data_state`` (a checkpoint's) replaces
    learning with what the training run learned.
    """

    def __init__(self, train_path: str | None, target: str, valid_path: str | None = None, test_path: str | None = None,
                 features: list[str] | None = None, categorical: list[str] = (), val_fraction: float | None = None,
                 test_fraction: float | None = None, standardize: bool = True, batch_size: int = 64,
                 shuffle: bool = True, num_workers: int = 0, pin_memory: bool | None = None, task: str = "auto",
                 name: str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 data_state: dict[str, Any] | None = None):
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be at least 1")
        parts = split_parts(shipped(name) if train_path is None else train_path, valid_path, test_path, val_fraction, test_fraction, seed)
        stored = (data_state or {}).get("table")
        if stored is not None:
            self.encoding = Encoding.from_state(stored)
            choose_features(parts, self.encoding.target, self.encoding.features, list(self.encoding.categories))
        else:
            categorical = list(categorical)
            chosen = choose_features(parts, target, features, categorical)
            self.encoding = Encoding.learn(parts["train"], target, chosen, categorical, standardize, task)
        self.splits = {split: TensorBatches(*self.encoding.encode(part)) for split, part in parts.items()}
        self.loading = SplitLoading(batch_size, shuffle, num_workers, pin_memory, seed, rank, world_size)

    def loader(self, split: str) -> DataLoader | None:
        """A loader over one split (None if the table has no such split)."""
        dataset = self.splits.get(split)
        return self.loading.fixed(dataset, split) if dataset is not None else None

    @property
    def classification(self) -> bool:
        return self.encoding.classes is not None

    def feature_names(self) -> list[str]:
        """One name per input column: ``column``, or ``column=value`` / ``column=<unseen>``."""
        names = []
        for column in self.encoding.features:
            values = self.encoding.categories.get(column)
            names += [column] if values is None else [f"{column}={v}" for v in [*values, "<unseen>"]]
        return names

    def runtime_kwargs(self) -> dict[str, Any]:
        """``in_features``, ``out_features`` and, for class labels, ``num_classes``."""
        classes = self.encoding.classes
        kwargs: dict[str, Any] = {"in_features": self.encoding.width(),
                                  "out_features": len(classes) if classes else 1}
        if classes:
            kwargs["num_classes"] = len(classes)
        return kwargs

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, strings and floats (a checkpoint loads them with ``weights_only=True``)."""
        return {"table": asdict(self.encoding)}
