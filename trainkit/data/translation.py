"""Parallel text for translation: TSV files (source TAB target), a subword tokenizer,
length-bucketed batches by a token budget.

``numbers_en_de`` (English number words -> German, made by scripts/make_numbers_en_de.py)
ships inside the package; ``data=tsv`` reads a user's own files. The tokenizer is trained
on the training split (cached by a hash of the data and settings) and its whole state is
kept in checkpoints, so a checkpoint alone is enough to translate.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from trainkit.core.errors import ConfigError
from trainkit.data.sampler import SplitLoading
from trainkit.data.tokenizers import KINDS, Tokenizer, tokenizer_from_state, train_tokenizer

log = logging.getLogger(__name__)
SHIPPED = Path(__file__).parent / "files"
SPLIT_FILES = {"train": "train.tsv", "val": "valid.tsv", "test": "test.tsv"}


def read_tsv(path: Path) -> tuple[list[str], list[str]]:
    """Source and target sentences; a malformed line is an error naming file and line."""
    if not path.is_file():
        raise ConfigError(f"data: {path}: no such file")
    sources, targets = [], []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                line = line.rstrip("\n").rstrip("\r")
                fields = line.split("\t")
                if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                    raise ConfigError(f"data: {path}:{number}: expected 'source<TAB>target' with both "
                                      f"sides non-empty, got {line[:60]!r}")
                sources.append(fields[0].strip())
                targets.append(fields[1].strip())
    except UnicodeDecodeError as error:
        raise ConfigError(f"data: {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not sources:
        raise ConfigError(f"data: {path}: the file is empty")
    return sources, targets


def runtime_for(tokenizer: Tokenizer) -> dict[str, Any]:
    """What the model, loss and task need to know about the token ids."""
    return {"src_vocab_size": tokenizer.vocab_size, "tgt_vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "ignore_index": tokenizer.pad_id, "tokenizer": tokenizer}


class PairBatches(Dataset):
    """Encoded pairs; indexing with a list of rows returns one padded batch (a dict)."""

    def __init__(self, sources: list[list[int]], targets: list[list[int]], target_text: list[str],
                 tokenizer: Tokenizer):
        self.sources, self.targets, self.target_text = sources, targets, target_text
        self.pad, self.bos, self.eos = tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id

    def __len__(self) -> int:
        return len(self.sources)

    def lengths(self) -> list[int]:
        """Padded positions a pair needs: source + EOS, or target + BOS/EOS."""
        return [max(len(s) + 1, len(t) + 1) for s, t in zip(self.sources, self.targets)]

    def __getitem__(self, rows: list[int]) -> dict[str, Any]:
        src = pad([self.sources[r] + [self.eos] for r in rows], self.pad)
        tgt_in = pad([[self.bos] + self.targets[r] for r in rows], self.pad)
        tgt_out = pad([self.targets[r] + [self.eos] for r in rows], self.pad)
        return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out,
                "target_text": [self.target_text[r] for r in rows]}


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return out


class TranslationData:
    """Train/val/test pairs from TSV files, tokenized and batched.

    ``max_pairs`` keeps only the first pairs of each split. ``max_tokens`` batches by a budget of padded tokens per batch (length-bucketed, little
    padding); otherwise ``batch_size`` sentences per batch. ``max_len`` drops longer
    training pairs (and truncates at evaluation). ``tokenizer``: bpe | unigram | word | char, trained
    on the training split, or a folder holding a Hugging Face tokenizer (a pretrained model's own).
    """

    def __init__(self, name: str = "numbers_en_de", train_path: str | None = None,
                 valid_path: str | None = None, test_path: str | None = None,
                 tokenizer: str = "bpe", vocab_size: int = 256, max_tokens: int | None = 4096,
                 batch_size: int | None = None, max_len: int = 128, shuffle: bool = True,
                 num_workers: int = 0, pin_memory: bool | None = None, cache_dir: str | None = None,
                 max_pairs: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 data_state: dict[str, Any] | None = None):
        if max_tokens is None and batch_size is None:
            raise ConfigError("data: set data.max_tokens (token budget) or data.batch_size (sentences)")
        paths = self.paths(name, train_path, valid_path, test_path)
        texts = {split: read_tsv(path) for split, path in paths.items() if path is not None}
        if max_pairs is not None:  # a quick subset, for tests and smoke runs
            texts = {split: (src[:max_pairs], tgt[:max_pairs]) for split, (src, tgt) in texts.items()}
        if data_state and "tokenizer" in data_state:
            self.tokenizer = tokenizer_from_state(data_state["tokenizer"])
        elif tokenizer not in KINDS:  # a Hugging Face model's own tokenizer, from its directory
            from trainkit.data.hf_tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(tokenizer, "data.tokenizer")
        else:
            cache = cache_dir or os.environ.get("TRAINKIT_CACHE", Path.home() / ".cache" / "trainkit")
            sources, targets = texts["train"]
            self.tokenizer = train_tokenizer([*sources, *targets], kind=tokenizer, vocab_size=vocab_size,
                                             cache_dir=Path(cache) / "tokenizers")
        self.splits = {split: self.encode(split, *pair, max_len) for split, pair in texts.items()}
        self.max_tokens = max_tokens
        self.loading = SplitLoading(batch_size, shuffle, num_workers, pin_memory, seed, rank, world_size)
        longest = max(self.splits["train"].lengths())
        if max_tokens is not None and longest > max_tokens:
            raise ConfigError(f"data.max_tokens={max_tokens} is smaller than the longest training pair "
                              f"({longest} tokens); raise it or lower data.max_len")

    @staticmethod
    def paths(name: str, train: str | None, valid: str | None, test: str | None) -> dict[str, Path | None]:
        if train is None:
            folder = SHIPPED / name
            if not folder.is_dir():
                shipped = sorted(p.name for p in SHIPPED.iterdir() if p.is_dir())
                raise ConfigError(f"data.name={name!r}: no shipped data set of that name (shipped: {shipped}); "
                                  "for your own files use data=tsv data.train_path=...")
            return {split: folder / file for split, file in SPLIT_FILES.items()}
        if valid is None:
            raise ConfigError("data.valid_path: required with data.train_path")
        return {"train": Path(train), "val": Path(valid), "test": Path(test) if test else None}

    def encode(self, split: str, sources: list[str], targets: list[str], max_len: int) -> PairBatches:
        encode = self.tokenizer.encode
        src, tgt = [encode(s) for s in sources], [encode(t) for t in targets]
        if split == "train":
            keep = [i for i in range(len(src)) if len(src[i]) < max_len and len(tgt[i]) < max_len]
            if len(keep) < len(src):
                log.warning("data: dropped %d training pairs longer than data.max_len=%d", len(src) - len(keep), max_len)
            src, tgt, targets = [src[i] for i in keep], [tgt[i] for i in keep], [targets[i] for i in keep]
        else:
            src, tgt = [s[: max_len - 1] for s in src], [t[: max_len - 1] for t in tgt]
        return PairBatches(src, tgt, targets, self.tokenizer)

    def runtime_kwargs(self) -> dict[str, Any]:
        return runtime_for(self.tokenizer)

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.state_dict()}

    def loader(self, split: str) -> DataLoader | None:
        dataset = self.splits.get(split)
        return self.loading.budgeted(dataset, split, self.max_tokens) if dataset is not None else None


class TsvTranslationData(TranslationData):
    """A user's own parallel TSV files: ``data.train_path``, ``valid_path`` (``test_path``)."""

    def __init__(self, train_path: str, valid_path: str, test_path: str | None = None, **kwargs: Any):
        super().__init__(name="tsv", train_path=train_path, valid_path=valid_path, test_path=test_path, **kwargs)
