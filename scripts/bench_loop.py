"""Loop overhead: trainkit against a minimal hand-written loop and PyTorch Lightning.

Every contender trains the same model on the same batches with the same seed and
settings (AdamW, clipping at 1.0, fp32), each in a fresh process, in alternation, several
rounds. A contender records a timestamp after every optimizer step; warm-up steps are
dropped and the median step time is reported, with the ratios trainkit/raw and
trainkit/Lightning and trainkit's overhead per step in microseconds.

Two modes. ``separate``: each process runs one contender; step times are compared across
processes, which on a shared machine differ by several percent from one process to the
next. ``interleaved``: each process runs one contender and, after each of its steps, one
step of a raw loop on its own copy of the model and batches (the "twin"); the contender's
median step-time ratio to its twin cancels machine drift and process-to-process
differences. The raw contender against its own twin is the control: its ratio shows the
method's bias (ideally 1.00).

    python scripts/bench_loop.py [--rounds 3] [--cases mlp nmt] [--modes separate interleaved] [--json out.json]
    python scripts/bench_loop.py --worker trainkit mlp 300 [--twin]   # one measurement (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

WARMUP = 20


def make_case(case: str):
    """(model, loader, loss_fn, task) for a case, built the same way for every contender."""
    import torch

    torch.manual_seed(0)
    if case == "mlp":
        from trainkit.data import ArrayData
        from trainkit.models import MLP
        from trainkit.tasks import SupervisedTask

        data = ArrayData("digits", batch_size=64, shuffle=True)
        model = MLP(64, 10, hidden_sizes=[32], dropout=0.0)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        return model, data.loader("train"), loss_fn, SupervisedTask(loss_fn)
    from trainkit.data import TranslationData
    from trainkit.models import Transformer
    from trainkit.tasks import Seq2SeqTask

    data = TranslationData("numbers_en_de", max_tokens=2048)
    model = Transformer(**{k: v for k, v in data.runtime_kwargs().items() if k in ("src_vocab_size", "tgt_vocab_size", "pad_id")})
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=0, label_smoothing=0.1)
    return model, data.loader("train"), loss_fn, Seq2SeqTask(loss_fn, data.tokenizer, metrics=["perplexity"], num_samples=0)


def batches_forever(loader):
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch) if loader.batch_sampler is not None else loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def raw_steps(case: str) -> Iterator[None]:
    """The hand-written loop, one optimizer step per ``next()``."""
    import torch

    model, loader, _, task = make_case(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for batch in batches_forever(loader):
        loss = task.loss_sum(model, batch)[0] / task.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield


class Clock:
    """Step times of a contender, from a call at the end of each of its optimizer steps.

    With ``twin`` (a raw loop on its own copy of the model and batches), every contender step
    is followed by one raw step in the same process, so both see the same machine load,
    memory and batch shapes; the contender's time runs from the end of the twin's step to
    the end of its own next step, and the twin's is its own step.
    """

    def __init__(self, twin: Iterator[None] | None = None):
        self.twin, self.own, self.paired = twin, [], []
        self.mark: float | None = None

    def __call__(self) -> None:
        now = time.perf_counter()
        if self.mark is not None:
            self.own.append(now - self.mark)
        if self.twin is not None:
            next(self.twin)
            end = time.perf_counter()
            self.paired.append(end - now)
            now = end
        self.mark = now

    def result(self) -> dict[str, float]:
        own = self.own[WARMUP:]
        out = {"median_s": statistics.median(own), "steps": len(own)}
        if self.twin is not None:
            twin = self.paired[WARMUP + 1:]  # aligned: own[i] ends just before paired[i + 1] starts
            out["twin_median_s"] = statistics.median(twin)
            out["ratio_to_twin"] = statistics.median(a / b for a, b in zip(own, twin))
            out["diff_to_twin_s"] = statistics.median(a - b for a, b in zip(own, twin))
        return out


def run_raw(case: str, steps: int, clock: Clock) -> None:
    for _ in zip(range(steps), raw_steps(case)):
        clock()


def run_trainkit(case: str, steps: int, clock: Clock) -> None:
    import torch

    from trainkit import Trainer
    from trainkit.callbacks import Callback

    model, loader, _, task = make_case(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Stamp(Callback):
        def on_step_end(self, trainer) -> None:
            clock()

    trainer = Trainer(model, optimizer, task=task, callbacks=[Stamp()], max_steps=steps, clip_grad_norm=1.0,
                      log_every_n_steps=50)
    trainer.fit(loader)


def run_lightning(case: str, steps: int, clock: Clock) -> None:
    import pytorch_lightning as pl
    import torch

    model, loader, _, task = make_case(case)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return task.loss_sum(self.model, batch)[0] / task.count(batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    class Stamp(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs) -> None:
            clock()

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Stamp()], log_every_n_steps=50, num_sanity_val_steps=0)
    trainer.fit(Module(), train_dataloaders=loader)


def worker(contender: str, case: str, steps: int, twin: bool) -> None:
    clock = Clock(raw_steps(case) if twin else None)
    {"raw": run_raw, "trainkit": run_trainkit, "lightning": run_lightning}[contender](case, steps, clock)
    print(json.dumps(clock.result()))


def lightning_available() -> bool:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        return False
    return True


def measure(contender: str, case: str, steps: int, twin: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--worker", contender, case, str(steps), *(["--twin"] if twin else [])]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(case: str, contenders: list[str], steps: int, rounds: int, twin: bool) -> dict[str, float]:
    """One process per contender and round, contenders in alternation (so drifts in machine
    load hit all of them); medians over rounds."""
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
    for _ in range(rounds):
        for contender in contenders:
            samples[contender].append(measure(contender, case, steps, twin))
    if not twin:
        medians = {c: statistics.median(s["median_s"] for s in v) for c, v in samples.items()}
        row = {f"{c}_ms": 1000 * m for c, m in medians.items()}
        row["overhead_us"] = 1e6 * (medians["trainkit"] - medians["raw"])
    else:  # each contender against its in-process raw twin; "raw" against its twin is the control
        medians = {c: statistics.median(s["ratio_to_twin"] for s in v) for c, v in samples.items()}
        row = {f"{c}_vs_twin": m for c, m in medians.items()}
        # Per-step difference to the twin, less the control's (the method's own bias).
        diffs = {c: statistics.median(s["diff_to_twin_s"] for s in v) for c, v in samples.items()}
        row["overhead_us"] = 1e6 * (diffs["trainkit"] - diffs["raw"])
    row["trainkit/raw"] = medians["trainkit"] / medians["raw"]
    if "lightning" in medians:
        row["trainkit/lightning"] = medians["trainkit"] / medians["lightning"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "CASE", "STEPS"))
    parser.add_argument("--twin", action="store_true", help="with --worker: interleave a raw twin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["mlp", "nmt"])
    parser.add_argument("--modes", nargs="+", default=["separate", "interleaved"], choices=["separate", "interleaved"])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: mlp 600, nmt 80)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), args.twin)
        return
    contenders = ["raw", "trainkit"] + (["lightning"] if lightning_available() else [])
    results = {}
    for case in args.cases:
        steps = args.steps or {"mlp": 600, "nmt": 80}[case]
        for mode in args.modes:
            row = compare(case, contenders, steps, args.rounds, twin=mode == "interleaved")
            results[f"{case} {mode}"] = row
            print(json.dumps({f"{case} {mode}": row}), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
