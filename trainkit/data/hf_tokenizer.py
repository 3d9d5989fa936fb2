"""Hugging Face tokenizers behind the interface of trainkit's ``Tokenizer``, whole in a checkpoint.

``load_tokenizer(DIR)`` reads a ``save_pretrained`` directory offline (no remote code);
``word_tokenizer(texts)`` builds a word-level one from training texts (lower-cased words and
punctuation, ``[PAD] [UNK] [CLS] [SEP]``), for a model built from a config with no tokenizer
of its own. ``HFTokenizer.state_dict()`` holds the tokenizer's files as bytes (safe for
``weights_only`` loads); ``from_state`` writes them to a temporary folder and loads them back,
accepting only plain file names of the kinds ``save_pretrained`` writes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainkit.core.errors import ConfigError

log = logging.getLogger("trainkit")
STATE_VERSION = 1
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.(json|txt|model|spm|codes|jinja)\Z")
MAX_STATE_BYTES = 256 * 2**20
SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}


class HFTokenizer:
    """A ``transformers`` tokenizer with the interface of ``trainkit.data.tokenizers.Tokenizer``
    (ids of the special tokens, ``vocab_size``, ``encode``, ``decode``, ``state_dict``): ``encode`` gives ids without special tokens (translation adds
    its own BOS/EOS); ``encode_rows`` tokenizes whole columns with the tokenizer's own special
    tokens, as its model was trained (``[CLS] a [SEP] b [SEP]``)."""

    kind = "hf"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:  # GPT-2 style: pad with EOS (masked out anyway)
            if tokenizer.eos_token is None:
                raise ConfigError("data.tokenizer: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.bos_id = first_id(tokenizer.bos_token_id, tokenizer.cls_token_id, self.pad_id)
        self.eos_id = first_id(tokenizer.eos_token_id, tokenizer.sep_token_id, self.pad_id)
        self.unk_id = tokenizer.unk_token_id
        self.files = saved_files(tokenizer)
        odd = [name for name in self.files if not FILE_NAME.match(name)]
        if odd:
            raise ConfigError(f"data.tokenizer: its file {odd[0]!r} is of a kind trainkit does not keep in "
                              "checkpoints (json, txt, model, spm, codes, jinja)")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_rows(self, first: Sequence[str], second: Sequence[str] | None, max_length: int) -> dict[str, list]:
        """Token ids (and token type ids, where the tokenizer makes them) of every row, truncated to
        ``max_length`` tokens with the special tokens counted."""
        return dict(self.tokenizer(list(first), list(second) if second is not None else None, truncation=True,
                                   max_length=max_length, return_attention_mask=False,
                                   return_token_type_ids=second is not None))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def fingerprint(self) -> str:
        """A hash of the tokenizer's files: equal fingerprints tokenize equally."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name] + b"\0")
        return digest.hexdigest()

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(directory))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": STATE_VERSION, "files": dict(self.files)}


def first_id(*ids: int | None) -> int:
    return next(i for i in ids if i is not None)


def saved_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for the tokenizer, by name."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def load_tokenizer(directory: str | Path, key: str = "data.tokenizer") -> HFTokenizer:
    """The tokenizer saved in a local directory (``save_pretrained``), offline."""
    from trainkit.core.hf import check_directory, transformers_module

    transformers = transformers_module()
    path = check_directory(str(directory), key)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as error:  # the tokenizers library raises plain Exceptions for malformed files
        text = " ".join(str(error).split())[:300]
        raise ConfigError(f"{key}={directory}: holds no tokenizer transformers can load: {text}") from None
    return HFTokenizer(tokenizer)


def from_state(state: dict[str, Any]) -> HFTokenizer:
    """The tokenizer of :meth:`HFTokenizer.state_dict`; ``ValueError`` for a bad state."""
    files = state.get("files")
    if state.get("version") != STATE_VERSION or not isinstance(files, dict) or not files:
        raise ValueError("hf tokenizer state needs version 1 and a 'files' mapping")
    if sum(len(data) for data in files.values() if isinstance(data, bytes)) > MAX_STATE_BYTES:
        raise ValueError("hf tokenizer state is larger than 256 MiB")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            if not isinstance(name, str) or not FILE_NAME.match(name) or not isinstance(data, bytes):
                raise ValueError(f"hf tokenizer state holds an unexpected file {name!r}")
            (Path(folder) / name).write_bytes(data)
        try:
            return load_tokenizer(folder, "checkpoint tokenizer")
        except ConfigError as error:
            raise ValueError(str(error)) from None


def word_tokenizer(texts: Sequence[str], vocab_size: int) -> HFTokenizer:
    """A word-level tokenizer learned from ``texts`` (the training split): lower-cased words and
    punctuation, the ``vocab_size`` most frequent kept, ``[CLS] a [SEP] (b [SEP])`` around rows."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    from trainkit.core.hf import transformers_module

    backend = Backend(WordLevel(unk_token=SPECIALS["unk_token"]))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(texts, WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values())))
    cls, sep = (backend.token_to_id(SPECIALS[k]) for k in ("cls_token", "sep_token"))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = transformers_module().PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)
    # Through its saved files, as every later load is: the same files, the same fingerprint (cache key).
    return from_state(HFTokenizer(fast).state_dict())
