"""Tokenizers whose whole state fits in a checkpoint.

Four kinds, all with the same fixed special ids (``pad=0, bos=1, eos=2, unk=3``):

- ``"bpe"`` and ``"unigram"``: sentencepiece subword models, trained in memory from the
  given texts. The state is the serialized model (``bytes``).
- ``"word"``: whitespace-split words; the vocabulary is every word of the texts.
- ``"char"``: single characters; the vocabulary is every character of the texts.

:meth:`Tokenizer.state_dict` returns only ``str``, ``bytes``, ``int``, ``list`` and
``dict`` values, so it can be stored in a checkpoint and read back with
``torch.load(..., weights_only=True)``; :func:`tokenizer_from_state` rebuilds the
tokenizer from it. sentencepiece is imported lazily, so importing this module is cheap.

Round trips: ``decode(encode(s)) == s`` holds for every text made of characters seen in
training (for ``"word"``: words seen in training, and ``s`` must be single-space
separated with no leading/trailing whitespace, since encoding splits on whitespace).
The sentencepiece models use the identity normalisation and keep whitespace as is, so
case, umlauts, ``ß``, hyphens and repeated spaces all survive. Unknown characters (or
words) encode to ``unk_id`` and decode to a visible placeholder (``" ⁇ "`` for
sentencepiece, ``"<unk>"`` for ``word``, ``"⁇"`` for ``char``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "SentencePieceTokenizer",
    "WordTokenizer",
    "CharTokenizer",
    "train_tokenizer",
    "tokenizer_from_state",
]

KINDS = ("bpe", "unigram", "word", "char")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # indexed by id
_NUM_SPECIAL = len(SPECIAL_TOKENS)
_STATE_VERSION = 1

# Everything that decides a trained sentencepiece model besides the texts, kind and
# vocab_size. num_threads is fixed: unigram training results depend on it.
_SPM_SETTINGS: dict[str, Any] = {
    "character_coverage": 1.0,
    "pad_id": PAD_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    "pad_piece": SPECIAL_TOKENS[PAD_ID],
    "bos_piece": SPECIAL_TOKENS[BOS_ID],
    "eos_piece": SPECIAL_TOKENS[EOS_ID],
    "unk_piece": SPECIAL_TOKENS[UNK_ID],
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": True,
    "byte_fallback": False,
    "hard_vocab_limit": False,
    "num_threads": 1,
}


class Tokenizer:
    """Base class: text <-> ids. Ids 0-3 are pad, bos, eos and unk for every kind."""

    kind: str = ""
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included (valid ids are ``0 .. vocab_size - 1``)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without BOS/EOS."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; pad, bos and eos ids are skipped (not cut at eos)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain state for :func:`tokenizer_from_state` (safe for ``weights_only`` loads)."""
        raise NotImplementedError

    def __reduce__(self):  # pickles (e.g. to DataLoader workers) via the plain state
        return tokenizer_from_state, (self.state_dict(),)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        out = []
        size = self.vocab_size
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                raise ValueError(
                    f"id {i} out of range for a {self.kind} tokenizer of vocab_size {size}"
                )
            if i not in (PAD_ID, BOS_ID, EOS_ID):
                out.append(i)
        return out


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``kind`` ``"bpe"`` or ``"unigram"``) held as bytes."""

    def __init__(self, model: bytes, kind: str):
        import sentencepiece as spm

        if kind not in ("bpe", "unigram"):
            raise ValueError(
                f"sentencepiece tokenizer kind must be 'bpe' or 'unigram', got {kind!r}"
            )
        if not isinstance(model, bytes) or not model:
            raise ValueError("sentencepiece tokenizer state needs non-empty 'model' bytes")
        try:
            sp = spm.SentencePieceProcessor(model_proto=model)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise ValueError(f"invalid sentencepiece model bytes: {e}") from e
        specials = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
        if specials != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ValueError(
                f"sentencepiece model has special ids (pad, bos, eos, unk) = {specials}, "
                f"expected {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}"
            )
        self.kind = kind
        self.model = model
        self._sp = sp

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(self._check_ids(ids))

    def pieces(self, text: str) -> list[str]:
        """The subword pieces of ``text`` (for inspection)."""
        return self._sp.encode(text, out_type=str)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": _STATE_VERSION, "model": self.model}


class _VocabTokenizer(Tokenizer):
    """A fixed token list: ``vocab[:4]`` are the special tokens, the rest regular tokens."""

    _unk_text = ""

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if len(vocab) < _NUM_SPECIAL or tuple(vocab[:_NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise ValueError(f"{self.kind} tokenizer vocab must start with {list(SPECIAL_TOKENS)}")
        if not all(isinstance(t, str) and t for t in vocab):
            raise ValueError(f"{self.kind} tokenizer vocab must hold non-empty strings")
        regular = vocab[_NUM_SPECIAL:]
        self._ids = {t: i for i, t in enumerate(regular, _NUM_SPECIAL)}
        if len(self._ids) != len(regular):
            raise ValueError(f"{self.kind} tokenizer vocab has duplicate tokens")
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _tokens(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(t, UNK_ID) for t in self._tokens(text)]

    def _token(self, i: int) -> str:
        return self._unk_text if i == UNK_ID else self.vocab[i]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "version": _STATE_VERSION, "vocab": list(self.vocab)}

    @classmethod
    def train(cls, tokens: Iterable[str]) -> _VocabTokenizer:
        counts = Counter(tokens)
        ordered = sorted(counts, key=lambda t: (-counts[t], t))  # frequency, then alphabetical
        return cls(list(SPECIAL_TOKENS) + ordered)


class WordTokenizer(_VocabTokenizer):
    """Whitespace-split words; words not in the vocab encode to ``unk_id``."""

    kind = "word"
    _unk_text = SPECIAL_TOKENS[UNK_ID]

    def _tokens(self, text: str) -> list[str]:
        return text.split()

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self._token(i) for i in self._check_ids(ids))


class CharTokenizer(_VocabTokenizer):
    """Single characters (spaces included); unseen characters encode to ``unk_id``."""

    kind = "char"
    _unk_text = "\u2047"  # ⁇

    def __init__(self, vocab: Sequence[str]):
        super().__init__(vocab)
        if any(len(t) != 1 for t in self.vocab[_NUM_SPECIAL:]):
            raise ValueError("char tokenizer vocab must hold single characters")

    def _tokens(self, text: str) -> list[str]:
        return list(text)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self._token(i) for i in self._check_ids(ids))


def _spm_cache_key(texts: Sequence[str], kind: str, vocab_size: int) -> str:
    import sentencepiece as spm

    h = hashlib.sha256()
    settings = {"kind": kind, "vocab_size": vocab_size, "spm": spm.__version__, **_SPM_SETTINGS}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _train_spm(texts: Sequence[str], kind: str, vocab_size: int) -> bytes:
    import sentencepiece as spm

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=writer,
            model_type=kind,
            vocab_size=vocab_size,
            minloglevel=2,  # no training log on stderr
            **_SPM_SETTINGS,
        )
    except RuntimeError as e:
        raise ValueError(
            f"training a {kind} tokenizer with vocab_size={vocab_size} failed: {e}"
        ) from e
    return writer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def train_tokenizer(
    texts: Sequence[str],
    kind: str = "bpe",
    vocab_size: int = 256,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``texts``; the same inputs give the same tokenizer.

    - ``"bpe"`` / ``"unigram"``: a sentencepiece model trained in memory, with
      ``character_coverage=1.0`` (every character of the texts is in the vocab), identity
      normalisation and whitespace kept as is. ``vocab_size`` counts the 4 special ids.
      It is a soft limit (``hard_vocab_limit=False``): if the texts cannot fill it, the
      vocab is smaller (see ``vocab_size`` of the result). It must be at least the
      number of distinct characters + 4, else ``ValueError``.
    - ``"word"``: every whitespace-separated word of the texts, sorted by frequency then
      alphabetically (after the 4 special tokens). ``vocab_size`` is ignored.
    - ``"char"``: every character of the texts (space included), ordered the same way.
      ``vocab_size`` is ignored.

    For a joint source/target vocabulary, pass the texts of both sides.

    ``cache_dir``: for ``"bpe"``/``"unigram"``, the trained model bytes are kept at
    ``cache_dir / f"{kind}-{vocab_size}-{sha256}.model"``, the hash covering the texts, the
    trainer settings and the sentencepiece version, and reused when present (written
    atomically). ``"word"``/``"char"`` train in no time and are never cached.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {list(KINDS)}")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("train_tokenizer expects a sequence of str")
    if not any(texts):
        raise ValueError("cannot train a tokenizer on no text")
    if kind == "word":
        return WordTokenizer.train(w for t in texts for w in t.split())
    if kind == "char":
        return CharTokenizer.train(c for t in texts for c in t)

    vocab_size = int(vocab_size)
    if vocab_size <= _NUM_SPECIAL:
        raise ValueError(f"vocab_size must be > {_NUM_SPECIAL} (the special ids), got {vocab_size}")
    cache_path = None
    if cache_dir is not None:
        cache_path = (
            Path(cache_dir) / f"{kind}-{vocab_size}-{_spm_cache_key(texts, kind, vocab_size)}.model"
        )
        if cache_path.is_file():
            try:
                return SentencePieceTokenizer(cache_path.read_bytes(), kind)
            except ValueError:
                pass  # corrupt cache entry: retrain and overwrite it
    tok = SentencePieceTokenizer(_train_spm(texts, kind, vocab_size), kind)
    if cache_path is not None:
        try:
            _write_atomic(cache_path, tok.model)
        except OSError as e:  # a cache is an optimisation: never fail training over it
            warnings.warn(f"could not write tokenizer cache {cache_path}: {e}", stacklevel=2)
    return tok


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state_dict`; ``ValueError`` on a bad state."""
    if not isinstance(state, dict):
        raise ValueError(f"tokenizer state must be a dict, got {type(state).__name__}")
    kind = state.get("kind")
    if kind == "hf":  # a Hugging Face tokenizer (trainkit.data.hf_tokenizer)
        from trainkit.data.hf_tokenizer import from_state

        return from_state(state)
    if kind not in KINDS:
        raise ValueError(f"tokenizer state has kind {kind!r}; expected one of {list(KINDS)}")
    version = state.get("version", _STATE_VERSION)
    if version != _STATE_VERSION:
        raise ValueError(
            f"unsupported tokenizer state version {version!r} (this trainkit reads {_STATE_VERSION})"
        )
    if kind in ("bpe", "unigram"):
        model = state.get("model")
        if not isinstance(model, bytes):
            raise ValueError(
                f"{kind} tokenizer state needs 'model' bytes, got {type(model).__name__}"
            )
        return SentencePieceTokenizer(model, kind)
    vocab = state.get("vocab")
    if not isinstance(vocab, list):
        raise ValueError(f"{kind} tokenizer state needs a 'vocab' list, got {type(vocab).__name__}")
    return (WordTokenizer if kind == "word" else CharTokenizer)(vocab)
