"""Tokenizers (trainkit.data.tokenizers) and the shipped numbers_en_de data files."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainkit.data import tokenizers as T
from trainkit.data.tokenizers import tokenizer_from_state, train_tokenizer

DATA_DIR = Path(T.__file__).resolve().parent / "files" / "numbers_en_de"
SPLIT_SIZES = {"train": 20_000, "valid": 1_000, "test": 1_000}
KINDS = ("bpe", "unigram", "word", "char")

# Hand-written strings: umlauts, ß, hyphens, capitals, characters the numbers lack.
HANDWRITTEN = [
    "über-größe straße",
    "Mädchen-Straße, äöü ÄÖÜ ß",
    "fünfundzwanzig-tausend",
    "twenty-one thousand, three hundred and forty-two",
    "zweihundertdreißig",
]


def read_pairs(split: str) -> list[tuple[str, str]]:
    text = (DATA_DIR / f"{split}.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t")) for line in text.split("\n")[:-1]]


@pytest.fixture(scope="module")
def samples() -> dict[str, list[str]]:
    train = read_pairs("train")[:1500]
    test = read_pairs("test")[:200]
    return {
        "train": [s for pair in train for s in pair] + HANDWRITTEN,
        "test": [s for pair in test for s in pair],
    }


@pytest.fixture(scope="module")
def toks(samples) -> dict[str, T.Tokenizer]:
    """One tokenizer per kind, trained on the train sample (word: train + test sample)."""
    out = {kind: train_tokenizer(samples["train"], kind, vocab_size=200) for kind in KINDS}
    out["word"] = train_tokenizer(samples["train"] + samples["test"], "word")
    return out


# --- the shipped data files -----------------------------------------------------------


def test_data_files_line_counts_fields_and_disjoint_splits():
    seen: dict[str, str] = {}
    for split, size in SPLIT_SIZES.items():
        raw = (DATA_DIR / f"{split}.tsv").read_bytes()
        assert raw.endswith(b"\n") and b"\r" not in raw
        lines = raw.decode("utf-8").split("\n")[:-1]
        assert len(lines) == size
        for line in lines:
            fields = line.split("\t")
            assert len(fields) == 2 and all(f and f == f.strip() for f in fields), line
            for sentence in fields:
                other = seen.setdefault(sentence, split)
                assert other == split, f"{sentence!r} in both {other} and {split}"


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_data_and_handwritten(toks, samples, kind):
    tok = toks[kind]
    texts = samples["train"][:400] + samples["test"] + HANDWRITTEN
    for s in texts:
        ids = tok.encode(s)
        assert T.UNK_ID not in ids, s
        assert tok.decode(ids) == s


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_round_trip_keeps_spacing(toks, kind):
    for s in ["zwei  und vierzig", " führend", "hinten "]:
        assert toks[kind].decode(toks[kind].encode(s)) == s


def test_word_tokenizer_unknown_word_is_unk(toks):
    tok = toks["word"]
    ids = tok.encode("forty-two quokka")
    assert ids[0] != T.UNK_ID and ids[1] == T.UNK_ID
    assert tok.decode(ids) == "forty-two <unk>"


def test_word_vocab_order_frequency_then_alphabetical():
    tok = train_tokenizer(["b a c", "c b", "c d"], "word", vocab_size=3)  # vocab_size ignored
    assert tok.vocab == [*T.SPECIAL_TOKENS, "c", "b", "a", "d"]
    assert tok.encode("a b c d e") == [6, 5, 4, 7, T.UNK_ID]


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_unknown_character_is_unk(toks, kind):
    ids = toks[kind].encode("x€y")
    assert T.UNK_ID in ids
    assert "€" not in toks[kind].decode(ids)


# --- special ids --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_fixed_and_skipped_by_decode(toks, kind):
    tok = toks[kind]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size > 4
    s = "three hundred and forty-two"
    ids = tok.encode(s)
    assert min(ids) >= 3  # never pad/bos/eos
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == s
    assert tok.decode(torch.tensor([tok.bos_id, *ids, tok.eos_id]).tolist()) == s
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_sentencepiece_pieces_are_the_special_tokens(toks):
    import sentencepiece as spm

    for kind in ("bpe", "unigram"):
        sp = spm.SentencePieceProcessor(model_proto=toks[kind].state_dict()["model"])
        assert [sp.id_to_piece(i) for i in range(4)] == list(T.SPECIAL_TOKENS)
        assert toks[kind].vocab_size == sp.get_piece_size() == 200


# --- state --------------------------------------------------------------------------


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return isinstance(x, str | bytes | int | float)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_survives_weights_only_load(toks, samples, kind):
    tok = toks[kind]
    state = tok.state_dict()
    assert state["kind"] == kind and _plain(state)
    buf = io.BytesIO()
    torch.save({"tokenizer": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["tokenizer"]
    rebuilt = tokenizer_from_state(loaded)
    assert type(rebuilt) is type(tok) and rebuilt.kind == kind
    assert rebuilt.vocab_size == tok.vocab_size
    assert rebuilt.state_dict() == state
    for s in samples["test"][:100] + HANDWRITTEN:
        assert rebuilt.encode(s) == tok.encode(s)
    again = pickle.loads(pickle.dumps(tok))  # DataLoader workers, spawn
    assert again.state_dict() == state


@pytest.mark.parametrize(
    "state, match",
    [
        ("bpe", "must be a dict"),
        ({}, "kind"),
        ({"kind": "sentencepiece"}, "kind"),
        ({"kind": "bpe"}, "model"),
        ({"kind": "unigram", "model": b"not a model"}, "invalid sentencepiece"),
        ({"kind": "word", "vocab": "abc"}, "vocab"),
        ({"kind": "word", "vocab": ["a", "b"]}, "must start with"),
        ({"kind": "char", "vocab": [*T.SPECIAL_TOKENS, "ab"]}, "single characters"),
        ({"kind": "word", "vocab": [*T.SPECIAL_TOKENS, "a", "a"]}, "duplicate"),
        ({"kind": "char", "version": 99, "vocab": [*T.SPECIAL_TOKENS, "a"]}, "version"),
    ],
)
def test_bad_state_raises_value_error(state, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_state(state)


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(["a b"], "wordpiece")
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", ""], "char")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abcdefghijklmnop qrstuvwxyz"], "bpe", vocab_size=12)


# --- training: determinism, soft vocab limit, cache -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic(toks, samples, kind):
    texts = samples["train"] if kind != "word" else samples["train"] + samples["test"]
    again = train_tokenizer(texts, kind, vocab_size=200)
    assert again.state_dict() == toks[kind].state_dict()


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_vocab_size_larger_than_data_allows(kind):
    texts = ["hallo welt", "guten tag", "hallo tag"]
    tok = train_tokenizer(texts, kind, vocab_size=1000)
    assert 4 < tok.vocab_size < 1000
    assert all(tok.decode(tok.encode(s)) == s for s in texts)
    assert train_tokenizer(texts, kind, vocab_size=1000).state_dict() == tok.state_dict()


def test_cache_hit_returns_same_tokenizer_without_retraining(samples, tmp_path, monkeypatch):
    texts = samples["train"][:600]
    tok = train_tokenizer(texts, "bpe", vocab_size=120, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("bpe-120-") and files[0].suffix == ".model"
    assert len(files[0].stem.split("-")[-1]) == 64  # sha256 hex
    assert files[0].read_bytes() == tok.state_dict()["model"]
    os.utime(files[0], (1_000_000_000, 1_000_000_000))

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(T, "_train_spm", no_training)
    cached = train_tokenizer(texts, "bpe", vocab_size=120, cache_dir=str(tmp_path))
    assert cached.state_dict() == tok.state_dict()
    assert os.stat(files[0]).st_mtime == 1_000_000_000
    monkeypatch.undo()

    # other settings or texts are other entries; no temp files are left behind
    train_tokenizer(texts, "bpe", vocab_size=121, cache_dir=tmp_path)
    train_tokenizer(texts[:-1], "bpe", vocab_size=120, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3

    # a corrupt entry is retrained and replaced
    files[0].write_bytes(b"garbage")
    again = train_tokenizer(texts, "bpe", vocab_size=120, cache_dir=tmp_path)
    assert again.state_dict() == tok.state_dict()
    assert files[0].read_bytes() == tok.state_dict()["model"]
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".model"]


def test_sentencepiece_is_imported_lazily():
    import subprocess
    import sys

    code = (
        "import sys, importlib.util; from pathlib import Path; "
        f"spec = importlib.util.spec_from_file_location('tok', {T.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "assert 'sentencepiece' not in sys.modules; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
