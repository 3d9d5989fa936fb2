"""Generate the shipped English -> German number-words translation data.

Each line pairs a number written out in English with the same number in German, both
as ``num2words`` 0.5.14 spells them (lowercase), e.g.::

    three hundred and forty-two<TAB>dreihundertzweiundvierzig

Numbers are drawn with a fixed seed from several magnitude ranges (0-99, 0-999,
0-99,999, 0-999,999: the range uniformly, then the number uniformly within it),
deduplicated by number until there are 22,000 distinct ones, shuffled and split into
1,000 valid, 1,000 test and 20,000 train pairs. No sentence (on either side) is shared
between splits. The output is deterministic: running the script twice gives
byte-identical files.

``num2words`` is a data-generation dependency only (``pip install trainkit[data]``);
the trainkit package never imports it.

Usage::

    python scripts/make_numbers_en_de.py [--seed 0] [--out trainkit/data/files/numbers_en_de]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from num2words import num2words

RANGES = (99, 999, 99_999, 999_999)  # inclusive upper bounds, lower bound is 0
N_TOTAL = 22_000
N_VALID = 1_000
N_TEST = 1_000
DEFAULT_OUT = (
    Path(__file__).resolve().parent.parent / "trainkit" / "data" / "files" / "numbers_en_de"
)


def _clean(text: str) -> str:
    text = " ".join(text.split())  # no TAB/newline/double spaces inside a sentence
    assert text and "\t" not in text and "\n" not in text, repr(text)
    return text


def pair(n: int) -> tuple[str, str]:
    """The (English, German) number words for ``n``."""
    return _clean(num2words(n, lang="en")), _clean(num2words(n, lang="de"))


def draw_numbers(seed: int, total: int = N_TOTAL) -> list[int]:
    """``total`` distinct numbers, shuffled, drawn deterministically from ``seed``."""
    rng = random.Random(seed)
    seen: set[int] = set()
    numbers: list[int] = []
    while len(numbers) < total:
        n = rng.randint(0, rng.choice(RANGES))
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    rng.shuffle(numbers)
    return numbers


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for src, tgt in pairs:
            f.write(f"{src}\t{tgt}\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)

    numbers = draw_numbers(args.seed)
    pairs = [pair(n) for n in numbers]
    splits = {
        "valid": pairs[:N_VALID],
        "test": pairs[N_VALID : N_VALID + N_TEST],
        "train": pairs[N_VALID + N_TEST :],
    }

    # Distinct numbers give distinct sentences on both sides; check it all the same.
    for side in (0, 1):
        seen: dict[str, str] = {}
        for name, split in splits.items():
            for p in split:
                other = seen.setdefault(p[side], name)
                assert other == name, f"{p[side]!r} is in both {other} and {name}"

    args.out.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for name in ("train", "valid", "test"):
        path = args.out / f"{name}.tsv"
        write_tsv(path, splits[name])
        size = path.stat().st_size
        total_bytes += size
        print(f"{name:5s}: {len(splits[name]):6d} pairs, {size:9,d} bytes -> {path}")
    print(f"total: {sum(map(len, splits.values())):6d} pairs, {total_bytes:9,d} bytes")
    print("examples:")
    for n, (src, tgt) in list(zip(numbers, pairs, strict=True))[N_VALID + N_TEST :][:5]:
        print(f"  {n:>7d}  {src}  ->  {tgt}")


if __name__ == "__main__":
    main()
