"""``data=text``'s tokenisation cache: building ``TextData`` with an empty cache against a warm one.

Writes a CSV of synthetic reviews (``scripts/make_text_data.py``'s templates, one to three
sentences a row, ``--rows`` rows) and a pretrained-style BERT tokenizer folder
(``BertTokenizerFast`` with a ``vocab.txt`` holding every lower-cased word and punctuation mark
of the texts, so whole words are tokens; written with ``save_pretrained``, loaded by trainkit
from ``data.tokenizer=DIR``). Each round builds ``TextData`` twice on a fresh cache folder:

- **cold**: the cache is empty; every split is tokenized and its ``.npz`` written;
- **warm**: the same construction again, which reads the ``.npz`` files back.

Both include reading the CSV, the split, learning the labels, loading the tokenizer and
hashing the texts (the cache key); only cold tokenizes and writes. Also timed, once a round:
the tokenizer's ``encode_rows`` over all rows alone (what the cache saves) and ``cache_key``
over all rows alone (what every construction pays to find the cache). Rounds alternate cold
and warm; medians and ranges are printed as a Markdown table. One construction on a small
file runs first, so no timed one pays the first imports.

    python scripts/bench_text_cache.py [--rows 150000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

MAX_LENGTH = 128


def write_reviews(path: Path, rows: int, seed: int = 0) -> list[str]:
    """``rows`` rows of ``text,label`` (one to three template reviews, the first one's label); returns the texts."""
    from make_text_data import review

    rng, texts = random.Random(seed), []
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["text", "label"])
        for _ in range(rows):
            sentences = [review(rng) for _ in range(rng.randint(1, 3))]
            text = " ".join(sentence for sentence, _ in sentences)
            writer.writerow([text, sentences[0][1]])
            texts.append(text)
    return texts


def write_bert_tokenizer(folder: Path, texts: list[str]) -> None:
    """A BERT tokenizer whose vocabulary is every word of ``texts`` (so no word is split)."""
    from tokenizers import pre_tokenizers
    from transformers import BertTokenizerFast

    split = pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in texts for word, _ in split.pre_tokenize_str(text.lower())})
    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(str(folder))


def build(train_path: Path, tokenizer: Path, cache_dir: Path):
    from trainkit.data import TextData

    return TextData(str(train_path), target="label", text="text", tokenizer=str(tokenizer), max_length=MAX_LENGTH,
                    val_fraction=0.1, cache_dir=str(cache_dir))


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the measurements here too")
    args = parser.parse_args()

    from trainkit.data.hf_tokenizer import load_tokenizer
    from trainkit.data.text import cache_key

    with tempfile.TemporaryDirectory(prefix="bench-text-cache-") as name:
        folder = Path(name)
        texts = write_reviews(folder / "reviews.csv", args.rows)
        write_bert_tokenizer(folder / "bert", texts)
        write_reviews(folder / "small.csv", 200, seed=1)
        build(folder / "small.csv", folder / "bert", folder / "cache-small")  # imports, not timed
        tokenizer = load_tokenizer(folder / "bert")
        runs = []
        for round_index in range(args.rounds):
            cache = folder / f"cache-{round_index}"
            cold_s, cold = timed(build, folder / "reviews.csv", folder / "bert", cache)
            warm_s, warm = timed(build, folder / "reviews.csv", folder / "bert", cache)
            for split in cold.splits:  # the cache gave back exactly what tokenizing gave
                assert (cold.splits[split].ids == warm.splits[split].ids).all(), split
            encode_s, encoded = timed(tokenizer.encode_rows, texts, None, MAX_LENGTH)
            hash_s, _ = timed(cache_key, tokenizer, [texts], MAX_LENGTH)
            files = sorted((cache / "text").glob("*.npz"))
            run = {"cold_s": cold_s, "warm_s": warm_s, "encode_s": encode_s, "hash_s": hash_s,
                   "cache_files": len(files), "cache_bytes": sum(path.stat().st_size for path in files),
                   "tokens": sum(len(row) for row in encoded["input_ids"]),
                   "rows": {split: len(rows) for split, rows in cold.splits.items()}}
            runs.append(run)
            print(json.dumps({"round": round_index, **run}), flush=True)
        csv_bytes = (folder / "reviews.csv").stat().st_size

    tokens, cache_bytes = runs[0]["tokens"], runs[0]["cache_bytes"]
    speedups = [run["cold_s"] / run["warm_s"] for run in runs]
    print(f"\n{args.rows:,} rows ({csv_bytes / 2**20:.1f} MiB CSV, {tokens:,} tokens with [CLS]/[SEP], "
          f"max_length {MAX_LENGTH}), {args.rounds} rounds; median (min-max):\n")
    print("| cold: empty cache (tokenize, write) | warm: cache hit (read .npz) | cold/warm | tokenisation alone "
          "(`encode_rows`, all rows) | cache key alone (hash of the texts) | cache files |")
    print("|---|---|---|---|---|---|")
    print(f"| {spread([r['cold_s'] for r in runs])} | {spread([r['warm_s'] for r in runs], digits=3)} "
          f"| {statistics.median(speedups):.1f}x ({min(speedups):.1f}-{max(speedups):.1f}) "
          f"| {spread([r['encode_s'] for r in runs])} | {spread([r['hash_s'] for r in runs], digits=3)} "
          f"| {runs[0]['cache_files']} files, {cache_bytes / 2**20:.1f} MiB ({cache_bytes / tokens:.1f} bytes/token) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "csv_bytes": csv_bytes, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
