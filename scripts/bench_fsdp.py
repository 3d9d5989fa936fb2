"""Per-rank memory of ``distributed.strategy=ddp`` against ``fsdp`` (issue 18).

Each case is a real ``python -m trainkit train +experiment=digits_mlp`` run with
``distributed.nproc_per_node=N`` on CPU (gloo, one thread per rank), a large MLP and a few
steps. ``MemoryProbe`` (a callback given on the command line) counts on every rank, exactly,
the bytes of model state that rank holds between steps:

- parameters: each ``DTensor`` by its local shard (``to_local()``), a plain tensor whole;
- gradients: summed in an optimizer step pre-hook, where they are complete (the loop sets them
  to ``None`` before ``on_step_end``);
- optimizer state: every tensor in ``optimizer.state`` (AdamW's two moments and its step);

and its peak resident set size (``ru_maxrss``) at the last step and at the end of fit (after
the final checkpoint). The goal: fsdp's model state per rank <= ddp's / N + 10%.

    python scripts/bench_fsdp.py            # 2 and 4 ranks, ~42M parameters
    python scripts/bench_fsdp.py --quick    # 2 ranks, a small model: a smoke run

Prints one JSON line per case, then the Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
GOAL_SLACK = 1.10  # fsdp <= ddp / N * 1.10


def local_bytes(tensor) -> int:
    """Bytes this rank stores for ``tensor`` (a DTensor's local shard only)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


class MemoryProbe:
    """Write this rank's model-state bytes and peak RSS to ``<out>/rank<R>.json`` (a callback)."""

    def __init__(self, out: str):
        self.out = Path(out)
        self.grad_bytes = 0
        self.record: dict = {}

    def on_fit_start(self, trainer) -> None:
        def count_gradients(optimizer, args, kwargs) -> None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.grad_bytes = max(self.grad_bytes, sum(local_bytes(g) for g in grads))

        trainer.optimizer.register_step_pre_hook(count_gradients)

    def on_step_end(self, trainer) -> None:
        import torch

        params = list(trainer.model.parameters())
        optimizer_bytes = sum(local_bytes(value) for state in trainer.optimizer.state.values()
                              for value in state.values() if torch.is_tensor(value))
        self.record = {
            "rank": trainer.dist.rank, "world_size": trainer.dist.world_size, "step": trainer.state.global_step,
            "params_total": sum(p.numel() for p in params),  # a DTensor's numel is the full tensor's
            "param_bytes": sum(local_bytes(p) for p in params),
            "grad_bytes": self.grad_bytes, "optimizer_bytes": optimizer_bytes,
            "peak_rss_step_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        }
        self.write()

    def on_fit_end(self, trainer) -> None:
        self.record["peak_rss_end_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{self.record['rank']}.json").write_text(json.dumps(self.record))


def run_case(strategy: str, ranks: int, hidden: list[int], steps: int, folder: Path) -> dict:
    """One ``trainkit train`` run; returns the per-rank records and the case's summary."""
    out = folder / f"{strategy}{ranks}"
    sizes = "[" + ",".join(map(str, hidden)) + "]"
    command = [sys.executable, "-m", "trainkit", "train", "+experiment=digits_mlp", f"model.hidden_sizes={sizes}",
               "model.dropout=0.0", f"distributed.nproc_per_node={ranks}", f"distributed.strategy={strategy}",
               "device=cpu", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "trainer.test_after_fit=false",
               "logging.tensorboard=false", f"hydra.run.dir={out}/run",
               f"+callbacks.mem={{_target_: bench_fsdp.MemoryProbe, out: {out}/probe}}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))}
    started = time.time()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{strategy} x{ranks} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    records = [json.loads((out / "probe" / f"rank{rank}.json").read_text()) for rank in range(ranks)]
    state = [r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"] for r in records]
    return {"strategy": strategy, "ranks": ranks, "params_total": records[0]["params_total"],
            "model_state_mib": max(state) / MIB, "param_mib": max(r["param_bytes"] for r in records) / MIB,
            "grad_mib": max(r["grad_bytes"] for r in records) / MIB,
            "optimizer_mib": max(r["optimizer_bytes"] for r in records) / MIB,
            "peak_rss_step_mib": max(r["peak_rss_step_bytes"] for r in records) / MIB,
            "peak_rss_end_mib": max(r["peak_rss_end_bytes"] for r in records) / MIB,
            "wall_s": time.time() - started}


def compare(results: list[dict]) -> list[dict]:
    """Add fsdp/ddp ratios and whether each fsdp case meets the 1/N + 10% goal."""
    ddp = {r["ranks"]: r for r in results if r["strategy"] == "ddp"}
    for r in results:
        base = ddp.get(r["ranks"])
        if r["strategy"] == "fsdp" and base:
            r["ratio"] = r["model_state_mib"] / base["model_state_mib"]
            r["goal"] = GOAL_SLACK / r["ranks"]
            r["goal_met"] = r["ratio"] <= r["goal"]
            r["rss_ratio"] = r["peak_rss_step_mib"] / base["peak_rss_step_mib"]
    return results


def table(results: list[dict]) -> str:
    lines = ["| strategy | ranks | parameters | model state / rank (params + grads + AdamW) | fsdp/ddp | "
             "goal <= 1/N + 10% | peak RSS / rank, training | peak RSS / rank, after final checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        parts = f"{r['model_state_mib']:.1f} MiB ({r['param_mib']:.1f} + {r['grad_mib']:.1f} + {r['optimizer_mib']:.1f})"
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
        goal = (f"{'yes' if r['goal_met'] else 'NO'} (<= {r['goal']:.3f})") if "goal" in r else "-"
        lines.append(f"| {r['strategy']} | {r['ranks']} | {r['params_total'] / 1e6:.1f}M | {parts} | {ratio} | {goal} "
                     f"| {r['peak_rss_step_mib']:.0f} MiB | {r['peak_rss_end_mib']:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 ranks, a small model (a smoke run)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="world sizes (default 2 4; quick: 2)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None,
                        help="model.hidden_sizes (default 4096 4096 4096 2048: 42.3M parameters)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    ranks = args.ranks or ([2] if args.quick else [2, 4])
    hidden = args.hidden or ([512, 512] if args.quick else [4096, 4096, 4096, 2048])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as folder:
        for n in ranks:
            for strategy in ("ddp", "fsdp"):
                results.append(run_case(strategy, n, hidden, args.steps, Path(folder)))
    for r in compare(results):
        print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
