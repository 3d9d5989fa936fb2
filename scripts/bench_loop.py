"""Loop overhead: trainkit against a minimal hand-written loop and PyTorch Lightning.

Every contender trains the same model on the same batches with the same seed and
settings (AdamW, clipping at 1.0, fp32), each in a fresh process, in alternation, several
rounds. A contender records a timestamp after every optimizer step; warm-up steps are
dropped and the median step time is reported, with the ratios trainkit/raw and
trainkit/Lightning and trainkit's overhead per step in microseconds.

    python scripts/bench_loop.py [--rounds 3] [--steps 300] [--cases mlp nmt] [--json out.json]
    python scripts/bench_loop.py --worker trainkit mlp 300   # one measurement (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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


def run_raw(case: str, steps: int) -> list[float]:
    import torch

    model, loader, _, task = make_case(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stamps = []
    model.train()
    for _, batch in zip(range(steps), batches_forever(loader)):
        loss = task.loss_sum(model, batch)[0] / task.count(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def run_trainkit(case: str, steps: int) -> list[float]:
    import torch

    from trainkit import Trainer
    from trainkit.callbacks import Callback

    model, loader, _, task = make_case(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stamps: list[float] = []

    class Stamp(Callback):
        def on_step_end(self, trainer) -> None:
            stamps.append(time.perf_counter())

    trainer = Trainer(model, optimizer, task=task, callbacks=[Stamp()], max_steps=steps, clip_grad_norm=1.0,
                      log_every_n_steps=50)
    trainer.fit(loader)
    return stamps


def run_lightning(case: str, steps: int) -> list[float]:
    import pytorch_lightning as pl
    import torch

    model, loader, _, task = make_case(case)
    stamps: list[float] = []

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
            stamps.append(time.perf_counter())

    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Stamp()], log_every_n_steps=50, num_sanity_val_steps=0)
    trainer.fit(Module(), train_dataloaders=loader)
    return stamps


def worker(contender: str, case: str, steps: int) -> None:
    stamps = {"raw": run_raw, "trainkit": run_trainkit, "lightning": run_lightning}[contender](case, steps)
    times = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    print(json.dumps({"median_s": statistics.median(times), "steps": len(times)}))


def lightning_available() -> bool:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        return False
    return True


def measure(contender: str, case: str, steps: int) -> float:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, __file__, "--worker", contender, case, str(steps)], capture_output=True,
                         text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "CASE", "STEPS"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["mlp", "nmt"])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: mlp 600, nmt 80)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return
    contenders = ["raw", "trainkit"] + (["lightning"] if lightning_available() else [])
    results = {}
    for case in args.cases:
        steps = args.steps or {"mlp": 600, "nmt": 80}[case]
        samples: dict[str, list[float]] = {c: [] for c in contenders}
        for _ in range(args.rounds):  # alternate, so drifts in machine load hit every contender
            for contender in contenders:
                samples[contender].append(measure(contender, case, steps))
        medians = {c: statistics.median(v) for c, v in samples.items()}
        row = {f"{c}_ms": 1000 * m for c, m in medians.items()}
        row["trainkit/raw"] = medians["trainkit"] / medians["raw"]
        row["overhead_us"] = 1e6 * (medians["trainkit"] - medians["raw"])
        if "lightning" in medians:
            row["trainkit/lightning"] = medians["trainkit"] / medians["lightning"]
        results[case] = row
        print(json.dumps({case: row}))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
