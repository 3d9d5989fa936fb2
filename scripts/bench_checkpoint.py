"""What checkpoint checksums cost: loading with and without verification, and the checksum at save.

For each size, a checkpoint of that many 1 MiB float32 tensors is written once with
``trainkit.core.checkpoint.save``; then, in every round, the two contenders run back to back in
alternating order (``read``: ``torch.load(weights_only=True)`` only; ``load``: the same plus
verifying every checksum), then the checksums of the loaded state (what ``load`` adds) and of
the in-memory state (what ``save`` adds) are timed on their own. Medians over the rounds; the
ratio is the median of the rounds' load/read ratios. The file is read from the page cache after
the first round, so this is the CPU cost of checking, not disk time.

    python scripts/bench_checkpoint.py [--sizes 1 50 200] [--rounds 7]

Prints one JSON object per size and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainkit.core import checkpoint

MIB = 2**20


def timed(function, argument) -> float:
    started = time.perf_counter()
    function(argument)
    return time.perf_counter() - started


def measure(size_mib: int, rounds: int, folder: Path) -> dict[str, float]:
    generator = torch.Generator().manual_seed(size_mib)
    state = {"model": {f"layer{i}.weight": torch.randn(MIB // 4, generator=generator) for i in range(size_mib)},
             "config": "seed: 0\n", "trainer_state": {"global_step": 1}}
    path = checkpoint.save(state, folder / f"{size_mib}.pt")
    times: dict[str, list[float]] = {"read": [], "load": [], "verify": [], "checksum": []}
    for round_index in range(rounds):
        order = ("read", "load") if round_index % 2 == 0 else ("load", "read")
        for name in order:
            times[name].append(timed(getattr(checkpoint, name), path))
        loaded = checkpoint.read(path)
        times["verify"].append(timed(checkpoint.checksums, loaded))  # what load adds to read
        times["checksum"].append(timed(checkpoint.checksums, state))  # what save adds to torch.save
    path.unlink()
    median_ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    ratio = statistics.median(load / read for load, read in zip(times["load"], times["read"]))
    return {"size_mib": size_mib, "read_ms": round(median_ms["read"], 2), "load_verified_ms": round(median_ms["load"], 2),
            "load_ratio": round(ratio, 3), "verify_ms_per_mib": round(median_ms["verify"] / size_mib, 3),
            "checksum_at_save_ms_per_mib": round(median_ms["checksum"] / size_mib, 3), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 50, 200], help="MiB of tensors")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            rows.append(measure(size, args.rounds, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ntorch {torch.__version__}, one thread, median of {args.rounds} alternated rounds\n")
    print("| tensors | load, unverified | load, verified | ratio | verification | checksum at save |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size_mib']} MiB | {row['read_ms']:.1f} ms | {row['load_verified_ms']:.1f} ms | "
              f"{row['load_ratio']:.2f}x | {row['verify_ms_per_mib']:.3f} ms/MiB | "
              f"{row['checksum_at_save_ms_per_mib']:.3f} ms/MiB |")


if __name__ == "__main__":
    main()
