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

``--tracking`` adds the contender ``trainkit+mlflow+csv``: the same Trainer with the trackers
``logging.mlflow=true logging.csv=true`` gives a run (metrics.jsonl, metrics.csv and an MLflow
run in a SQLite store in a temporary folder; no TensorBoard, no checkpoints), started before the
first step so MLflow's import and table creation stay out of the step times. Its mean step
time per log interval is reported too (``window_mean``): the logging step and the background
sender's batch (one every ``--log-every`` steps) slow a few steps, which a median would not
show. It also times ``RunLogger.log_metrics`` per call with each set of trackers, and one batch
of the MLflow sender, in-process.

    python scripts/bench_loop.py [--rounds 3] [--cases mlp nmt] [--modes separate interleaved] [--tracking] [--json out.json]
    python scripts/bench_loop.py --worker trainkit mlp 300 [--twin]   # one measurement (internal)
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
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

WARMUP = 20
TRACKED = "trainkit+mlflow+csv"


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

    def __init__(self, twin: Iterator[None] | None = None, window: int = 50):
        self.twin, self.own, self.paired, self.window = twin, [], [], window
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
        out = {"median_s": statistics.median(own), "mean_s": statistics.fmean(own),
               "window_mean_s": window_mean(own, self.window), "steps": len(own)}
        if self.twin is not None:
            twin = self.paired[WARMUP + 1:]  # aligned: own[i] ends just before paired[i + 1] starts
            diffs = [a - b for a, b in zip(own, twin)]
            out["twin_median_s"] = statistics.median(twin)
            out["ratio_to_twin"] = statistics.median(a / b for a, b in zip(own, twin))
            out["diff_to_twin_s"] = statistics.median(diffs)
            out["mean_diff_to_twin_s"] = statistics.fmean(diffs)
            out["window_mean_diff_to_twin_s"] = window_mean(diffs, self.window)
        return out


def window_mean(values: list[float], window: int) -> float:
    """The median over consecutive windows of ``window`` steps (one log interval: each holds one
    logging step) of the mean per window. Unlike the median step, it counts what a logging step
    and work it leaves to a background thread cost; unlike the plain mean, a load spike on a
    shared machine spoils one window, not the figure."""
    means = [statistics.fmean(values[first:first + window]) for first in range(0, len(values) - window + 1, window)]
    return statistics.median(means) if means else statistics.fmean(values)


def run_raw(case: str, steps: int, clock: Clock) -> None:
    for _ in zip(range(steps), raw_steps(case)):
        clock()


def run_trainkit(case: str, steps: int, clock: Clock, log_every: int = 50, tracking: bool = False) -> None:
    import torch

    from trainkit import Trainer
    from trainkit.callbacks import Callback

    model, loader, _, task = make_case(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    class Stamp(Callback):
        def on_step_end(self, trainer) -> None:
            clock()

    with ExitStack() as stack:  # on exit: the MLflow run is finished (queue drained), the folder removed
        logger = stack.enter_context(tracked_logger(Path(stack.enter_context(tempfile.TemporaryDirectory())),
                                                    case)) if tracking else None
        trainer = Trainer(model, optimizer, task=task, callbacks=[Stamp()], max_steps=steps, clip_grad_norm=1.0,
                          log_every_n_steps=log_every, logger=logger)
        trainer.fit(loader)
    if tracking:  # every logged event reached the store: the contender did the whole job
        mlflow = logger.trackers[-1]
        assert mlflow.run_id is not None and not mlflow.failed, "MLflow tracking failed (see the warning above)"


def tracked_logger(folder: Path, case: str):
    """The loggers ``logging.mlflow=true logging.csv=true logging.tensorboard=false`` give a run
    (``trainkit.run.train``): metrics.jsonl and metrics.csv in ``folder/run``, an MLflow run in
    ``folder/mlflow.db``, started here (MLflow imported, tables made) before any step is timed."""
    from trainkit.core.logs import RunLogger
    from trainkit.core.mlflow_tracker import MlflowTracker

    run_dir = folder / "run"
    run_dir.mkdir()
    mlflow = MlflowTracker(f"sqlite:///{folder / 'mlflow.db'}", "bench_loop", run_dir, {"case": case}, "",
                           run_name=f"bench_loop {case}").start()
    return RunLogger(run_dir, tensorboard=False, csv=True, trackers=[mlflow])


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


def worker(contender: str, case: str, steps: int, twin: bool, log_every: int = 50) -> None:
    clock = Clock(raw_steps(case) if twin else None, window=log_every)
    if contender == "raw":
        run_raw(case, steps, clock)
    elif contender == "lightning":
        run_lightning(case, steps, clock)
    else:
        run_trainkit(case, steps, clock, log_every, tracking={"trainkit": False, TRACKED: True}[contender])
    print(json.dumps(clock.result()))


def log_call_cost(calls: int = 300) -> dict[str, float]:
    """In-process: µs per ``RunLogger.log_metrics`` call (the train metrics of one log interval)
    with no trackers (the bench's plain contender), metrics.jsonl only, + metrics.csv, + MLflow
    (started on a temporary SQLite store); and ms per batch the MLflow sender sends, which runs
    in its background thread. A 2 ms pause between calls lets the sender drain, as steps would."""
    from trainkit.core.logs import RunLogger

    metrics = {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 1.2, "train/step_s": 0.001,
               "train/samples_per_s": 6e4}
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        mlflow_logger = tracked_logger(folder, "log_call")
        mlflow = mlflow_logger.trackers[-1]
        loggers = {"none": RunLogger(None), "jsonl": RunLogger(folder / "jsonl", tensorboard=False),
                   "jsonl+csv": RunLogger(folder / "csv", tensorboard=False, csv=True), "jsonl+csv+mlflow": mlflow_logger}
        for name in ("jsonl", "csv"):
            (folder / name).mkdir()
        times: dict[str, list[float]] = {name: [] for name in loggers}
        for step in range(1, calls + 1):
            for name, logger in loggers.items():  # alternating, so machine load hits all alike
                started = time.perf_counter()
                logger.log_metrics(metrics, step, 0)
                times[name].append(time.perf_counter() - started)
                time.sleep(0.002)
        for logger in loggers.values():
            logger.__exit__(None, None, None)
        assert mlflow.run_id is not None and not mlflow.failed, "MLflow tracking failed (see the warning above)"
        for name, samples in times.items():
            samples = sorted(samples[10:])
            out[f"{name}_median_us"] = 1e6 * statistics.median(samples)
            out[f"{name}_p90_us"] = 1e6 * samples[int(0.9 * len(samples))]
        # What the sender does per batch (in its thread, sharing the GIL with the loop): one log_batch.
        from mlflow.entities import Metric

        (folder / "sender").mkdir()
        client_logger = tracked_logger(folder / "sender", "sender")
        sender = client_logger.trackers[-1]
        batch_times, batch_cpu = [], []
        for step in range(1, 31):
            batch = [Metric(key, value, int(time.time() * 1000), step) for key, value in metrics.items()]
            started, cpu = time.perf_counter(), time.thread_time()
            sender.send(batch)
            batch_times.append(time.perf_counter() - started)
            batch_cpu.append(time.thread_time() - cpu)  # CPU time of the thread: an upper bound on its GIL time
        client_logger.__exit__(None, None, None)
        out["mlflow_sender_batch_ms"] = 1e3 * statistics.median(batch_times[5:])
        out["mlflow_sender_batch_cpu_ms"] = 1e3 * statistics.median(batch_cpu[5:])
    return out


def lightning_available() -> bool:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        return False
    return True


def measure(contender: str, case: str, steps: int, twin: bool, log_every: int = 50) -> dict[str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--worker", contender, case, str(steps), "--log-every", str(log_every),
               *(["--twin"] if twin else [])]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(case: str, contenders: list[str], steps: int, rounds: int, twin: bool, log_every: int = 50) -> dict[str, float]:
    """One process per contender and round, contenders in alternation (so drifts in machine
    load hit all of them); medians over rounds."""
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in contenders}
    for _ in range(rounds):
        for contender in contenders:
            samples[contender].append(measure(contender, case, steps, twin, log_every))
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
    if TRACKED in medians:  # the trackers' cost: against raw, and against trainkit without them
        if not twin:
            row[f"{TRACKED}_overhead_us"] = 1e6 * (medians[TRACKED] - medians["raw"])
        else:
            row[f"{TRACKED}_overhead_us"] = 1e6 * (diffs[TRACKED] - diffs["raw"])
        row[f"{TRACKED}/raw"] = medians[TRACKED] / medians["raw"]
        row[f"{TRACKED}/trainkit"] = medians[TRACKED] / medians["trainkit"]
        # Per-window means: a step the sender thread slowed counts in full (a median would not show it).
        for kind in ("window_mean", "mean"):
            key = f"{kind}_diff_to_twin_s" if twin else f"{kind}_s"
            means = {c: statistics.median(s[key] for s in samples[c]) for c in ("raw", "trainkit", TRACKED)}
            for c in ("trainkit", TRACKED):
                row[f"{c}_{kind}_overhead_us"] = 1e6 * (means[c] - means["raw"])
        row["per_round"] = {c: [round(1e6 * s["diff_to_twin_s" if twin else "median_s"], 1) for s in samples[c]]
                            for c in contenders}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "CASE", "STEPS"))
    parser.add_argument("--twin", action="store_true", help="with --worker: interleave a raw twin")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["mlp", "nmt"])
    parser.add_argument("--modes", nargs="+", default=["separate", "interleaved"], choices=["separate", "interleaved"])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: mlp 600, nmt 80)")
    parser.add_argument("--log-every", type=int, default=50, help="trainkit's log_every_n_steps")
    parser.add_argument("--tracking", action="store_true",
                        help=f"add the contender {TRACKED} and time RunLogger.log_metrics per call")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), args.twin, args.log_every)
        return
    contenders = ["raw", "trainkit"] + ([TRACKED] if args.tracking else []) + (["lightning"] if lightning_available() else [])
    results = {}
    for case in args.cases:
        steps = args.steps or {"mlp": 600, "nmt": 80}[case]
        for mode in args.modes:
            row = compare(case, contenders, steps, args.rounds, twin=mode == "interleaved", log_every=args.log_every)
            results[f"{case} {mode}"] = row
            print(json.dumps({f"{case} {mode}": row}), flush=True)
    if args.tracking:
        results["log_metrics"] = log_call_cost(calls=60 if args.steps and args.steps < 100 else 300)
        print(json.dumps({"log_metrics": results["log_metrics"]}), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
