"""``data=text``: text classification, regression and sentence pairs from a user's files.

Files are read by ``data=table``'s reader (CSV, TSV, JSONL, Parquet, Feather, or a folder saved
by ``datasets``' ``save_to_disk``), with its splits: ``train_path`` plus ``valid_path``/
``test_path``, a ``split`` column, or ``val_fraction``/``test_fraction`` drawn with the run's
seed. ``text`` names one column, or two for sentence pairs; ``target`` the label (class names,
sorted and saved in checkpoints, or numbers for regression, as ``data=table`` decides).

The tokenizer is ``tokenizer: DIR`` (a ``save_pretrained`` folder), else the model's own
(``model.pretrained``), else a word-level one learned from the training texts. Every split is
tokenized once and cached on disk (``cache_dir``, default ``$TRAINKIT_CACHE`` or
``~/.cache/trainkit``, under ``text/``), keyed by a hash of the split's texts, the tokenizer's
files and ``max_length``: a second run reads the ids back instead of tokenizing. A cache
file is data like any other: one that does not hold consistent ids is replaced, never used.

Batches are ``({"input_ids", "attention_mask"[, "token_type_ids"]}, targets)``, padded to the
batch's longest row: ``batch_size`` rows, or at most ``max_tokens`` padded tokens with rows
of similar length together (``TokenBatches``, as translation batches), each plan seeded and
sharded by rank for exact resume and DDP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.data.hf_tokenizer import HFTokenizer, load_tokenizer, word_tokenizer
from trainkit.data.sampler import SplitLoading
from trainkit.data.table import (
    Part,
    check_complete,
    learn_classes,
    split_parts,
    strings,
    target_kind,
    target_values,
)
from trainkit.data.tokenizers import tokenizer_from_state

log = logging.getLogger("trainkit")
CACHE_VERSION = 2  # 2: sentence pairs keep their token type ids


@dataclass
class Labels:
    """What the training rows decide: the text columns, the target and its class names (sorted;
    None for regression)."""

    text: list[str]
    target: str
    classes: list[str] | None


class TokenRows(Dataset):
    """Token ids of every row, stored flat (``ids[offsets[i]:offsets[i + 1]]`` is row ``i``);
    indexing with a list of rows returns one padded batch."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, type_ids: np.ndarray | None, targets: torch.Tensor,
                 pad_id: int):
        self.ids, self.offsets, self.type_ids = ids, offsets, type_ids
        self.targets, self.pad_id = targets, pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def __getitem__(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        width = max(end - start for start, end in spans)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if self.type_ids is not None else None
        for row, (start, end) in enumerate(spans):
            ids[row, : end - start] = torch.from_numpy(self.ids[start:end].astype(np.int64))
            mask[row, : end - start] = 1
            if types is not None:
                types[row, : end - start] = torch.from_numpy(self.type_ids[start:end].astype(np.int64))
        inputs = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            inputs["token_type_ids"] = types
        return inputs, self.targets[rows]


class TextData:
    """Text rows from a user's files, tokenized (once, cached) and batched; see the module docstring."""

    def __init__(self, train_path: str | None, target: str, text: str | list[str] = "text",
                 valid_path: str | None = None, test_path: str | None = None, tokenizer: str | None = None,
                 model_dir: str | None = None, max_length: int = 128, vocab_size: int = 8000,
                 batch_size: int = 32, max_tokens: int | None = None, val_fraction: float | None = None,
                 test_fraction: float | None = None, shuffle: bool = True, num_workers: int = 0,
                 pin_memory: bool | None = None, cache_dir: str | None = None, task: str = "auto", name: str | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, data_state: dict[str, Any] | None = None):
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"data: batch_size={batch_size} must be at least 1 and max_length={max_length} at least 2")
        parts = split_parts(shipped_text(name) if train_path is None else train_path, valid_path, test_path,
                            val_fraction, test_fraction, seed)
        state = data_state or {}
        if "labels" in state:
            self.labels = Labels(**state["labels"])
            self.tokenizer = tokenizer_from_state(state["tokenizer"])
        else:
            self.labels = learn_labels(parts, text, target, task)
            self.tokenizer = choose_tokenizer(tokenizer, model_dir, parts["train"], self.labels.text, vocab_size)
        columns = [*self.labels.text, self.labels.target]
        for part in parts.values():
            check_columns(part, columns)
            check_complete(part, columns)
        cache = Path(cache_dir or os.environ.get("TRAINKIT_CACHE", Path.home() / ".cache" / "trainkit")) / "text"
        self.splits = {split: self.encode(part, max_length, cache) for split, part in parts.items()}
        self.max_tokens = max_tokens
        if max_tokens is not None and max_tokens < max_length:
            raise ConfigError(f"data.max_tokens={max_tokens} is smaller than data.max_length={max_length}: "
                              "the longest row would fit no batch")
        self.loading = SplitLoading(batch_size, shuffle, num_workers, pin_memory, seed, rank, world_size)

    def encode(self, part: Part, max_length: int, cache: Path) -> TokenRows:
        columns = [strings(part, column).to_pylist() for column in self.labels.text]
        ids, offsets, type_ids = cached_tokens(self.tokenizer, columns, max_length, cache)
        empty = np.flatnonzero(np.diff(offsets) == 0)
        if len(empty):
            raise ConfigError(f"{part.where(self.labels.text[0], int(empty[0]))}: the text gives no tokens; "
                              "fill it in or drop the row")
        targets = target_values(part, self.labels.target, self.labels.classes)
        return TokenRows(ids, offsets, type_ids, targets, self.tokenizer.pad_id)

    def loader(self, split: str) -> DataLoader | None:
        dataset = self.splits.get(split)
        return self.loading.budgeted(dataset, split, self.max_tokens) if dataset is not None else None

    def runtime_kwargs(self) -> dict[str, Any]:
        """``vocab_size``, ``pad_id`` and ``num_classes``/``class_names`` (class labels) or
        ``out_features`` (numbers)."""
        kwargs: dict[str, Any] = {"vocab_size": self.tokenizer.vocab_size, "pad_id": self.tokenizer.pad_id}
        classes = self.labels.classes
        if classes:
            kwargs.update(num_classes=len(classes), class_names=list(classes))
        else:
            kwargs["out_features"] = 1
        return kwargs

    def state_dict(self) -> dict[str, Any]:
        return {"labels": asdict(self.labels), "tokenizer": self.tokenizer.state_dict()}


def shipped_text(name: str | None) -> str:
    from trainkit.data.arrays import FILES

    if name is None:
        raise ConfigError("data.train_path: required (a CSV, TSV, JSONL or Parquet file, or a saved dataset folder)")
    path = FILES / f"{name}.csv"
    if not path.is_file():
        raise ConfigError(f"data.name={name!r}: no shipped text set of that name; for your own file use "
                          "data.train_path=FILE")
    return str(path)


def text_columns(text: str | list[str]) -> list[str]:
    columns = [text] if isinstance(text, str) else [str(column) for column in text]
    if not 1 <= len(columns) <= 2:
        raise ConfigError(f"data.text={text!r}: one column, or two for sentence pairs ([premise, hypothesis])")
    return columns


def check_columns(part: Part, columns: list[str]) -> None:
    names = part.table.column_names
    for column in columns:
        if column not in names:
            raise ConfigError(f"data: {part.file} has no column {column!r}{did_you_mean(column, names)} "
                              f"(its columns: {', '.join(names[:30])}); set data.text and data.target")


def learn_labels(parts: dict[str, Part], text: str | list[str], target: str, task: str) -> Labels:
    train, columns = parts["train"], text_columns(text)
    check_columns(train, [*columns, target])
    if target in columns:
        raise ConfigError(f"data.target={target!r} is also a text column; a model must not read what it predicts")
    kind = target_kind(task, train, target)
    return Labels(columns, target, learn_classes(train, target) if kind == "classification" else None)


def choose_tokenizer(tokenizer: str | None, model_dir: str | None, train: Part, columns: list[str],
                     vocab_size: int) -> HFTokenizer:
    """``data.tokenizer``, else the model's directory, else a word-level tokenizer of the training texts."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer, "data.tokenizer")
    if model_dir is not None:
        return load_tokenizer(model_dir, "model.pretrained")
    texts = [value for column in columns for value in strings(train, column).to_pylist()]
    return word_tokenizer(texts, vocab_size)


def cache_key(tokenizer: HFTokenizer, columns: list[list[str]], max_length: int) -> str:
    digest = hashlib.sha256(f"trainkit-text-{CACHE_VERSION}-{max_length}-{len(columns)}".encode())
    digest.update(tokenizer.fingerprint().encode())
    for column in columns:
        for value in column:
            data = value.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: no two lists collide
    return digest.hexdigest()


def cached_tokens(tokenizer: HFTokenizer, columns: list[list[str]], max_length: int,
                  cache: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(flat ids, row offsets, flat token type ids or None) of the rows, from the cache when it
    holds them; else tokenized and written to it (a cache that cannot be written only warns)."""
    path = cache / f"{cache_key(tokenizer, columns, max_length)}.npz"
    if path.is_file():
        loaded = read_cache(path, len(columns[0]), tokenizer.vocab_size)
        if loaded is not None:
            return loaded
    encoded = tokenizer.encode_rows(columns[0], columns[1] if len(columns) > 1 else None, max_length)
    rows = encoded["input_ids"]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    ids = np.fromiter((i for row in rows for i in row), dtype=np.int32, count=int(offsets[-1]))
    type_ids = None
    if "token_type_ids" in encoded and len(columns) > 1:
        type_ids = np.fromiter((t for row in encoded["token_type_ids"] for t in row), dtype=np.int8,
                               count=int(offsets[-1]))
    write_cache(path, ids, offsets, type_ids)
    return ids, offsets, type_ids


def read_cache(path: Path, rows: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """The arrays of a cache file when they are consistent; None (and a warning) otherwise."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            ids, offsets = arrays["ids"], arrays["offsets"]
            type_ids = arrays["type_ids"] if "type_ids" in arrays.files else None
        sound = (ids.dtype == np.int32 and offsets.dtype == np.int64 and offsets.shape == (rows + 1,)
                 and offsets[0] == 0 and offsets[-1] == len(ids) and bool(np.all(np.diff(offsets) >= 0))
                 and (len(ids) == 0 or (ids.min() >= 0 and ids.max() < vocab_size))
                 and (type_ids is None or (type_ids.shape == ids.shape and np.isin(type_ids, (0, 1)).all())))
    except Exception as error:  # a damaged zip, a missing array: the cache is derived data, made again
        log.warning("data: tokenisation cache %s cannot be read (%s); tokenizing again", path, error)
        return None
    if not sound:
        log.warning("data: tokenisation cache %s does not fit these rows; tokenizing again", path)
        return None
    return ids, offsets, type_ids


def write_cache(path: Path, ids: np.ndarray, offsets: np.ndarray, type_ids: np.ndarray | None) -> None:
    """Atomically (a temporary file renamed into place); a failure is a warning."""
    arrays = {"ids": ids, "offsets": offsets, **({"type_ids": type_ids} if type_ids is not None else {})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".npz", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("data: cannot write the tokenisation cache %s: %s", path, error)
