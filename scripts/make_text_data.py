"""Write ``trainkit/data/files/reviews_tiny.csv``, the small text set of ``+experiment=text_classify_tiny``.

Short product reviews made from templates, each labelled ``positive``, ``negative`` or
``neutral``; some negate their adjective ("not great" is negative), so word counts alone do
not solve it. Columns ``text,label,split`` (train 1,500 / val 300 / test 300 rows); the same
seed writes the same bytes.

    python scripts/make_text_data.py [--out trainkit/data/files] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

ITEMS = ["phone", "laptop", "kettle", "backpack", "camera", "blender", "chair", "lamp", "headset", "watch",
         "jacket", "printer", "mattress", "speaker", "keyboard", "tent", "drill", "monitor", "router", "book"]
GOOD = ["great", "excellent", "wonderful", "reliable", "sturdy", "comfortable", "fantastic", "solid", "lovely",
        "superb"]
BAD = ["terrible", "awful", "flimsy", "broken", "useless", "disappointing", "noisy", "cheap", "faulty", "poor"]
PLAIN = ["okay", "average", "fine", "ordinary", "acceptable", "standard", "adequate", "decent enough"]
OPENERS = ["", "Honestly, ", "Well, ", "After a month, ", "To be fair, ", "In short, ", "Overall, "]
ENDINGS = [".", "!", ". Would buy again.", ". Returned it.", ". Nothing more to say.", ". Delivery was quick."]
SPLITS = {"train": 1500, "val": 300, "test": 300}


def review(rng: random.Random) -> tuple[str, str]:
    item, opener, ending = rng.choice(ITEMS), rng.choice(OPENERS), rng.choice(ENDINGS)
    label = rng.choice(["positive", "negative", "neutral"])
    negated = label != "neutral" and rng.random() < 0.3
    if label == "neutral":
        words = rng.choice(PLAIN)
        sentence = rng.choice([f"the {item} is {words}", f"this {item} seems {words}", f"it is an {words} {item}"])
    else:
        pool = BAD if (label == "positive") == negated else GOOD
        word = rng.choice(pool)
        verb = "is not" if negated else "is"
        sentence = rng.choice([f"the {item} {verb} {word}", f"this {item} {verb} really {word}",
                               f"my new {item} {verb} {word}"])
    text = opener + sentence
    return text[0].upper() + text[1:] + ending, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "trainkit" / "data" / "files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    path = args.out / "reviews_tiny.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["text", "label", "split"])
        for split, count in SPLITS.items():
            for _ in range(count):
                writer.writerow([*review(rng), split])
    print(f"wrote {path} ({sum(SPLITS.values())} rows)")


if __name__ == "__main__":
    main()
