"""Tiny Hugging Face models and text files for tests/test_hf.py, all made offline in seconds.

``bert_dir`` and ``bart_dir`` write what a user downloads once and keeps: a ``save_pretrained``
folder with a model and its tokenizer (a BERT for sequence classification, hidden size 32,
one layer; a BART 1+1 layers, d_model 32). ``reviews`` makes text rows whose label follows
from one word in them, so a tiny model learns them in a few steps.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path

GOOD = ["great", "lovely", "excellent", "sturdy", "perfect", "superb"]
BAD = ["awful", "broken", "poor", "flimsy", "terrible", "useless"]
THINGS = ["lamp", "chair", "camera", "book", "kettle", "mattress", "phone", "desk"]
FILLER = ["really", "quite", "honestly", "so", "very", "truly", "", "", ""]
# A tiny BERT, as model.config keys (the command line's `model.config={...}`) and as BertConfig arguments.
BERT_SIZES = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "max_position_embeddings": 64}


def reviews(rows: int, seed: int) -> dict[str, list]:
    """``text`` (a short review) and ``label`` (``positive``/``negative``, by the review's one
    opinion word); the first row is positive, so label order of appearance is not sorted order."""
    rng = random.Random(seed)
    texts, labels = [], []
    for row in range(rows):
        positive = row == 0 or rng.random() < 0.5
        words = ["the", rng.choice(THINGS), "is", rng.choice(FILLER), rng.choice(GOOD if positive else BAD)]
        texts.append(" ".join(word for word in words if word) + rng.choice([".", "!", ""]))
        labels.append("positive" if positive else "negative")
    return {"text": texts, "label": labels}


def pairs(rows: int, seed: int) -> dict[str, list]:
    """Sentence pairs: ``premise``, ``hypothesis`` and ``label`` (``same``: both name one thing)."""
    rng = random.Random(seed)
    columns: dict[str, list] = {"premise": [], "hypothesis": [], "label": []}
    for _ in range(rows):
        first, second = rng.choice(THINGS), rng.choice(THINGS)
        columns["premise"].append(f"i bought a {first}")
        columns["hypothesis"].append(f"the {second} arrived {rng.choice(FILLER)}".strip())
        columns["label"].append("same" if first == second else "different")
    return columns


def write_csv(columns: dict[str, list], path: Path) -> Path:
    """A CSV file with a header row, columns in the mapping's order."""
    names = list(columns)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(names)
        writer.writerows(zip(*(columns[name] for name in names)))
    return path


def bert_dir(folder: Path, texts: Sequence[str], num_labels: int = 2, dropout: float = 0.1, seed: int = 0) -> Path:
    """A local "pretrained" BERT for sequence classification with its own word-level tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from trainkit.data.hf_tokenizer import word_tokenizer

    tokenizer = word_tokenizer(list(texts), vocab_size=200)
    config = BertConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **BERT_SIZES)
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def byte_pair_tokenizer(texts: Sequence[str], vocab_size: int = 300):
    """A BART-style BPE tokenizer (``<s> </s> <pad> <unk>``) trained on ``texts``, as transformers
    wraps one (``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    backend = Tokenizer(BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(texts, BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values())))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def bart_dir(folder: Path, texts: Sequence[str], seed: int = 0) -> Path:
    """A local "pretrained" BART (1+1 layers, d_model 32) with a BPE tokenizer of ``texts``."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = byte_pair_tokenizer(texts)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.bos_token_id, forced_eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    BartForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def numbers_pairs(count: int) -> list[tuple[str, str]]:
    """The first ``count`` (English, German) pairs of the shipped numbers_en_de training split."""
    from trainkit.data.translation import SHIPPED

    lines = (SHIPPED / "numbers_en_de" / "train.tsv").read_text(encoding="utf-8").splitlines()[:count]
    return [tuple(line.split("\t")) for line in lines]
