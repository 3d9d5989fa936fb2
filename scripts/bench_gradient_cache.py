"""Peak memory and step time of contrastive training with and without the gradient cache.

Each setting runs in a fresh process (one thread): an MLP encoder, InfoNCE over a large batch
of digits views, a few optimizer steps. Peak memory is the process's resident-set high-water
mark during the timed steps (``VmHWM`` after resetting it through ``/proc/self/clear_refs``)
minus the resident set before them, so torch's CPU allocations are counted (tracemalloc would
not see them). Linux only.

    python scripts/bench_gradient_cache.py                      # batch 4096, chunks none/1024/256/64
    python scripts/bench_gradient_cache.py --batch 2048 --chunks none 128 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(batch: int, chunk: int | None, hidden: list[int], embedding: int, steps: int) -> dict:
    import numpy as np
    import torch

    from trainkit.core.precision import Precision
    from trainkit.data.arrays import FILES
    from trainkit.models import MLP
    from trainkit.tasks.contrastive import ContrastiveTask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pixels = torch.as_tensor(np.load(FILES / "digits.npz")["x"], dtype=torch.float32) / 16.0
    images = pixels[torch.randint(len(pixels), (batch,), generator=torch.Generator().manual_seed(0))]
    model = MLP(64, embedding, hidden_sizes=hidden, dropout=0.0)  # no dropout: every chunking gives the same loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    task = ContrastiveTask(64, gradient_cache_chunk_size=chunk)
    precision = Precision(torch.device("cpu"))

    def step() -> float:
        loss, _ = task.forward_backward(model, (images, None), batch, precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss) / batch

    first_loss = step()  # warm-up: allocates the optimizer state
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident set
    before = status_mb("VmRSS")
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    return {"batch": batch, "chunk_size": chunk, "first_loss": first_loss, "step_ms": 1000 * seconds,
            "peak_step_memory_mb": status_mb("VmHWM") - before, "resident_before_mb": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--chunks", nargs="+", default=["none", "1024", "256", "64"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="also write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        chunk = None if args.chunk == "none" else int(args.chunk)
        print(json.dumps(worker(args.batch, chunk, args.hidden, args.embedding, args.steps)))
        return
    rows = []
    # A fixed mmap threshold: glibc returns every large block to the OS when it is freed, so the
    # resident set follows live tensors (its default dynamic threshold keeps freed blocks cached).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    for chunk in args.chunks:
        command = [sys.executable, __file__, "--worker", "--chunk", chunk, "--batch", str(args.batch),
                   "--hidden", *map(str, args.hidden), "--embedding", str(args.embedding), "--steps", str(args.steps)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MLP encoder 64 -> {args.hidden} -> {args.embedding}, batch {args.batch} images (x2 views), 1 thread\n")
    print("| chunk_size | peak step memory (MiB) | step time (ms) | loss of step 1 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['chunk_size'] or 'none (plain)'} | {row['peak_step_memory_mb']:.0f} | "
              f"{row['step_ms']:.0f} | {row['first_loss']:.6f} |")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
