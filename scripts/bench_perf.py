"""Start-up, batching, decoding, data loading, torch.compile and activation checkpointing.

Each measurement runs the real trainkit code path and prints one JSON line; ``--all``
runs them in sequence (one heavy process at a time) and prints a Markdown table.

    python scripts/bench_perf.py --all
    python scripts/bench_perf.py startup | padding | decoding | workers | compile | checkpointing
    python scripts/bench_perf.py --quick startup padding decoding workers   # a smoke run (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"on": False}  # --quick: a few steps and one repeat each, to check the code runs, not to measure


def scaled(n: int) -> int:
    """``n`` steps or repeats, or under --quick 6 steps (n > 6) or 1 repeat."""
    return (6 if n > 6 else 1) if QUICK["on"] else n


RAW_FIRST_STEP = """
import sys, time
import numpy as np
import torch
arrays = np.load(sys.argv[1])
train = arrays["split"] == 0
x = torch.as_tensor(arrays["x"][train], dtype=torch.float32) / 16
y = torch.as_tensor(arrays["y"][train])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(256, 128),
                            torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10))  # digits_mlp's model
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randperm(len(x))[:64]
torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
optimizer.step()
optimizer.zero_grad()
open(sys.argv[2], "w").write(repr(time.time()))
"""


def startup(repeats: int = 3) -> dict:
    """Seconds from process start to the end of the first optimizer step, against `import torch`
    and against a hand-written script doing the same first step (which pays what PyTorch
    itself costs on the way: the first ``optimizer.step()`` imports ``torch._dynamo``)."""
    import_torch, first_step, raw_first_step, import_dynamo = [], [], [], []
    for _ in range(scaled(repeats)):
        started = time.time()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        import_torch.append(time.time() - started)
        out = subprocess.run([sys.executable, "-c", "import time, torch; t = time.time(); import torch._dynamo; "
                              "print(time.time() - t)"], check=True, capture_output=True, text=True)
        import_dynamo.append(float(out.stdout))
        with tempfile.TemporaryDirectory() as folder:
            stamp = Path(folder) / "first_step"
            started = time.time()
            subprocess.run([sys.executable, "-c", RAW_FIRST_STEP, str(ROOT / "trainkit/data/files/digits.npz"), str(stamp)],
                           check=True)
            raw_first_step.append(float(stamp.read_text()) - started)
            stamp.unlink()
            started = time.time()
            subprocess.run([sys.executable, "-m", "trainkit", "train", "+experiment=digits_mlp", "trainer.max_steps=1",
                            "scheduler=none", f"hydra.run.dir={folder}/run",
                            f"+callbacks.stamp={{_target_: bench_helpers.StampFirstStep, path: {stamp}}}"],
                           check=True, capture_output=True, cwd=folder,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")})
            first_step.append(float(stamp.read_text()) - started)
    torch_s, step_s, raw_s = (statistics.median(v) for v in (import_torch, first_step, raw_first_step))
    return {"import_torch_s": torch_s, "import_dynamo_s": statistics.median(import_dynamo),
            "raw_first_step_s": raw_s, "first_step_s": step_s,
            "difference_s": step_s - torch_s, "beyond_raw_s": step_s - raw_s}


def nmt_data(**kwargs):
    from trainkit.data import TranslationData

    return TranslationData("numbers_en_de", **kwargs)


def padding_fraction(loader, epoch: int = 0) -> tuple[float, int]:
    plan = loader.sampler
    plan.set_epoch(epoch)
    dataset = loader.dataset
    real = padded = 0
    for batch in plan:
        sources = [len(dataset.sources[i]) + 1 for i in batch]
        targets = [len(dataset.targets[i]) + 1 for i in batch]
        real += sum(sources) + sum(targets)
        padded += len(batch) * (max(sources) + max(targets))
    return 1 - real / padded, len(plan)


def tokens_per_second(loader, steps: int, warmup: int = 10) -> float:
    """Target tokens per second training the nmt_base model on this loader (the real
    Trainer), over the steps after ``warmup``."""
    import torch

    from trainkit import Trainer
    from trainkit.models import Transformer
    from trainkit.tasks import Seq2SeqTask

    torch.manual_seed(0)
    tokenizer = nmt_data(max_tokens=2048).tokenizer
    model = Transformer(tokenizer.vocab_size, tokenizer.vocab_size)
    task = Seq2SeqTask(torch.nn.CrossEntropyLoss(ignore_index=0), tokenizer, metrics=["perplexity"], num_samples=0)
    marks: list[tuple[float, float]] = []

    class Mark:
        def on_step_end(self, trainer) -> None:
            if trainer.state.global_step in (min(warmup, steps - 1), steps):
                marks.append((trainer.train_units, trainer.train_seconds))

    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), task=task, max_steps=steps,
                      log_every_n_steps=10**6, callbacks=[Mark()])
    trainer.fit(loader)
    (units_0, seconds_0), (units_1, seconds_1) = marks
    return (units_1 - units_0) / (seconds_1 - seconds_0)


def padding(rounds: int = 3) -> dict:
    """Token-budget bucketing against fixed-size random batches of the same mean size:
    padding, and training tokens/s (median of rounds, the two in alternation)."""
    bucketed = nmt_data(max_tokens=2048).loader("train")
    bucket_padding, batches = padding_fraction(bucketed)
    sentences = round(len(bucketed.dataset) / batches)
    naive = nmt_data(max_tokens=None, batch_size=sentences).loader("train")
    naive_padding, _ = padding_fraction(naive)
    speeds: dict[str, list[float]] = {"bucketed": [], "naive": []}
    for _ in range(scaled(rounds)):
        for name, loader in (("bucketed", bucketed), ("naive", naive)):
            speeds[name].append(tokens_per_second(loader, scaled(60)))
    results = {"bucketed_padding": bucket_padding, "naive_padding": naive_padding, "sentences_per_batch": sentences,
               "bucketed_tokens_per_s": statistics.median(speeds["bucketed"]),
               "naive_tokens_per_s": statistics.median(speeds["naive"])}
    results["speedup"] = results["bucketed_tokens_per_s"] / results["naive_tokens_per_s"]
    # What removing padding alone can win if a step's cost were proportional to its token
    # slots (padded or not): the ratio of real tokens per slot.
    results["padding_bound"] = (1 - bucket_padding) / (1 - naive_padding)
    return results


def decoding() -> dict:
    """Sentences per second: incremental (cached) greedy and beam-4 against full re-decoding."""
    import torch

    from trainkit.models import Transformer
    from trainkit.models.decoding import beam_search, greedy_decode

    torch.manual_seed(0)
    model = Transformer(256, 256).eval()
    src = torch.randint(4, 256, (64, 12))
    never = 10**6  # an EOS id that never appears: every row decodes max_len tokens in every variant
    results = {}
    for name, run in {
        "greedy_incremental": lambda: greedy_decode(model, src, 1, never, 24, incremental=True),
        "greedy_full": lambda: greedy_decode(model, src, 1, never, 24, incremental=False),
        "beam4_incremental": lambda: beam_search(model, src, 1, never, 4, 24),
    }.items():
        times = []
        for _ in range(scaled(3)):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        results[f"{name}_sentences_per_s"] = len(src) / statistics.median(times)
    results["greedy_speedup"] = results["greedy_incremental_sentences_per_s"] / results["greedy_full_sentences_per_s"]
    return results


def workers() -> dict:
    """Training tokens/s on nmt_base batches with num_workers 0 and 2."""
    return {f"workers_{n}_tokens_per_s": tokens_per_second(nmt_data(max_tokens=2048, num_workers=n).loader("train"), scaled(60))
            for n in (0, 2)}


def compiled() -> dict:
    """Compile time and step time of the nmt_base model with trainer.compile true/false."""
    import torch

    from trainkit import Trainer
    from trainkit.models import Transformer
    from trainkit.tasks import Seq2SeqTask

    loader = nmt_data(max_tokens=2048).loader("train")
    tokenizer = nmt_data(max_tokens=2048).tokenizer
    class Stamp:
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, trainer) -> None:
            self.stamps.append(time.perf_counter())

    results = {}
    for compile_model in (False, True):
        torch.manual_seed(0)
        model = Transformer(tokenizer.vocab_size, tokenizer.vocab_size)
        task = Seq2SeqTask(torch.nn.CrossEntropyLoss(ignore_index=0), tokenizer, metrics=["perplexity"], num_samples=0)
        stamp = Stamp()
        started = time.perf_counter()
        trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-3), task=task, max_steps=40,
                          compile=compile_model, callbacks=[stamp], log_every_n_steps=10**6)
        trainer.fit(loader)
        stamps = stamp.stamps
        steps = [b - a for a, b in zip(stamps[10:], stamps[11:])]
        label = "compiled" if compile_model else "eager"
        results[f"{label}_first_step_s"] = stamps[0] - started
        results[f"{label}_step_ms"] = 1000 * statistics.median(steps)
    results["speedup"] = results["eager_step_ms"] / results["compiled_step_ms"]
    return results


def checkpointing() -> dict:
    """Peak memory (max RSS of a fresh process) and step time with and without
    model.gradient_checkpointing, nmt_base model, 4096-token batches."""
    results = {}
    for enabled in (False, True):
        code = (
            "import resource, time, torch\n"
            "from trainkit.models import Transformer\n"
            "torch.manual_seed(0)\n"
            f"model = Transformer(256, 256, num_encoder_layers=6, num_decoder_layers=6, gradient_checkpointing={enabled})\n"
            "src = torch.randint(4, 256, (256, 32)); tgt = torch.randint(4, 256, (256, 32))\n"
            "times = []\n"
            "for _ in range(4):\n"
            "    t = time.perf_counter(); model(src, tgt).float().logsumexp(-1).sum().backward(); times.append(time.perf_counter() - t)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, sorted(times)[1])\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        label = "checkpointing" if enabled else "plain"
        results[f"{label}_peak_rss_mb"] = float(out[0])
        results[f"{label}_step_s"] = float(out[1])
    return results


MEASUREMENTS = {"startup": startup, "padding": padding, "decoding": decoding, "workers": workers,
                "compile": compiled, "checkpointing": checkpointing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=[*MEASUREMENTS, []])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, one repeat")
    args = parser.parse_args()
    QUICK["on"] = args.quick
    for name in (list(MEASUREMENTS) if args.all else args.names):
        print(json.dumps({name: MEASUREMENTS[name]()}), flush=True)


if __name__ == "__main__":
    main()
