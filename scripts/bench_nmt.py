"""The main job, measured: `trainkit train +experiment=nmt_base` as a user runs it.

Records wall time of the whole command, time to the best checkpoint (the validation that
produced best.pt, from metrics.jsonl), test sacreBLEU and exact match (best.pt on the test
split) and training tokens/s, and prints a Markdown row for BENCHMARKS.md.

    python scripts/bench_nmt.py [overrides ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    overrides = sys.argv[1:]
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "trainkit", "train", "+experiment=nmt_base",
                        f"hydra.run.dir={folder}/run", *overrides], check=True)
        wall = time.monotonic() - started
        run = Path(folder) / "run"
        result = json.loads((run / "result.json").read_text())
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        best_event = next(e for e in events if e.get(result["monitor"]) == result["best_metric"])
    row = {
        "wall_time_s": round(wall, 1),
        "time_to_best_s": best_event["time_s"],
        "best_step": best_event["step"],
        "test_bleu": round(result["test"]["test/bleu"], 2),
        "test_exact_match": result["test"]["test/exact_match"],
        "tokens_per_s": round(result["throughput"]["tokens_per_second"]),
    }
    print(json.dumps(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
