"""Fine-tuning speed: trainkit's loop against ``transformers.Trainer`` on the same model and data.

Both contenders fine-tune the same BERT (hidden 128, 2 layers, 2 heads, intermediate 256, built
once from a config with seed 0 and written with ``save_pretrained``, so both load the same
weights) on the same synthetic review set (``scripts/make_text_data.py``'s templates, 3,200
training rows: every batch is full), with the same word-level tokenizer (trainkit's
``word_tokenizer`` of the training texts, saved beside the model), max_length 64, batch 32,
AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01 on matrices only, ``torch.optim.AdamW``
in both: HF's ``optim="adamw_torch"``), a constant learning rate, clipping at 1.0, fp32, the same
number of optimizer steps, one validation pass at the end, no checkpoint during training, and
the same number of torch threads. Batches are padded to their longest row in both (trainkit's
``TokenRows``; ``DataCollatorWithPadding`` in HF, over a ``datasets.Dataset``).

- **trainkit**: ``train_model`` on the config ``trainkit train model=hf model.pretrained=DIR
  data=text ...`` composes (the CLI's path, minus Hydra's run directory and console set-up),
  with one ``model.train()`` before the first step (the benchmark's callback does it).
- **trainkit_as_is** (``--contenders``): the same without that call. It found a bug, fixed
  since: ``from_pretrained`` returns the model in eval mode and ``HFModel`` did not switch it
  back, so dropout stayed off until the first validation. ``HFModel`` now ends its
  ``__init__`` with ``self.train()``, and this contender runs the same training as trainkit.
- **hf**: ``transformers.Trainer`` with ``TrainingArguments(use_cpu=True, report_to="none",
  save_strategy="no", eval_strategy="steps", eval_steps=steps)``.

Each run is a fresh process; the contenders alternate (trainkit, hf, trainkit, hf, ...). A
callback in each loop stamps the end of every optimizer step: samples/s over the steps after
the first ``WARMUP`` (steady state), and over the whole training phase (from the loop's start
to the last step's end). Both include everything a step costs: building and padding the batch,
forward, backward, clipping, the optimizer, the loop's bookkeeping and its logging every 50
steps; neither includes imports, tokenisation, model loading, the final validation or saving.

    pip install "accelerate>=1.1"     # transformers.Trainer needs it (trainkit does not)
    python scripts/bench_hf_trainer.py [--rounds 3] [--steps 600] [--threads 1] [--json out.json]
    python scripts/bench_hf_trainer.py --contenders trainkit trainkit_as_is hf
    python scripts/bench_hf_trainer.py --worker CONTENDER SETUP_DIR   # one run (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

STARTED = time.perf_counter()  # before the heavy imports: a worker's set-up time counts from here
WARMUP = 10
SETTINGS = {"batch_size": 32, "max_length": 64, "lr": 1e-3, "weight_decay": 0.01, "clip": 1.0, "log_every": 50,
            "train_rows": 3200, "val_rows": 800, "seed": 0}
MODEL = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 256, "max_position_embeddings": 128}
CONTENDERS = {
    "trainkit": "trainkit (`train_model`), model in training mode from step 1",
    "trainkit_as_is": "trainkit (`train_model`) as is: dropout off until the first validation",
    "hf": "`transformers.Trainer`",
}


class StepClock:
    """A callback for either loop: ``perf_counter`` at the loop's start and at each step's end,
    written to ``path`` as JSON when the loop ends. With ``train_mode``, trainkit's model is put
    in training mode before the first step (see ``CONTENDERS``)."""

    def __init__(self, path: str, train_mode: bool = False):
        self.path, self.start, self.steps, self.train_mode = Path(path), None, [], train_mode

    def begin(self) -> None:
        self.start = time.perf_counter()

    def stamp(self) -> None:
        self.steps.append(time.perf_counter())

    def write(self) -> None:
        self.path.write_text(json.dumps({"start": self.start, "steps": self.steps}))

    # trainkit's hooks
    def on_fit_start(self, trainer) -> None:
        if self.train_mode:
            trainer.model.train()
        self.begin()

    def on_step_end(self, trainer, *args, **kwargs) -> None:  # HF passes (args, state, control)
        self.stamp()

    def on_fit_end(self, trainer) -> None:
        self.write()


def hf_clock(path: str):
    """``StepClock`` as a ``transformers.TrainerCallback``."""
    from transformers import TrainerCallback

    class HFClock(TrainerCallback, StepClock):
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.stamp()

        def on_train_end(self, args, state, control, **kwargs):
            self.write()

    return HFClock(path)


# Set-up (the parent process, once) --------------------------------------------------------
def write_rows(path: Path, rows: int, rng: random.Random) -> None:
    import csv

    from make_text_data import review

    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["text", "label"])
        for _ in range(rows):
            writer.writerow(review(rng))


def prepare(folder: Path) -> dict:
    """Data files, and the model and tokenizer both contenders load, in ``folder``."""
    import csv

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from trainkit.data.hf_tokenizer import word_tokenizer

    rng = random.Random(SETTINGS["seed"] + 1)  # not the shipped reviews_tiny: more rows, a multiple of the batch
    write_rows(folder / "train.csv", SETTINGS["train_rows"], rng)
    write_rows(folder / "val.csv", SETTINGS["val_rows"], rng)
    with open(folder / "train.csv", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = sorted({row["label"] for row in rows})
    tokenizer = word_tokenizer([row["text"] for row in rows], 8000)
    config = AutoConfig.for_model(**MODEL, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                                  num_labels=len(classes), id2label=dict(enumerate(classes)),
                                  label2id={name: i for i, name in enumerate(classes)},
                                  problem_type="single_label_classification")
    torch.manual_seed(SETTINGS["seed"])
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": tokenizer.vocab_size,
            "classes": classes}


# The two contenders (one per worker process) ------------------------------------------------
def run_trainkit(folder: Path, steps: int, seed: int, clock_path: Path, train_mode: bool = True) -> dict:
    from trainkit import train_model
    from trainkit.commands.config import compose

    cfg = compose([
        "model=hf", f"model.pretrained={folder / 'model'}", "model.head=classification",
        "data=text", f"data.train_path={folder / 'train.csv'}", f"data.valid_path={folder / 'val.csv'}",
        "data.text=text", "data.target=label", f"data.max_length={SETTINGS['max_length']}",
        f"data.batch_size={SETTINGS['batch_size']}", "data.num_workers=0",
        "optimizer=adamw", f"optimizer.lr={SETTINGS['lr']}", f"optimizer.weight_decay={SETTINGS['weight_decay']}",
        "scheduler=none", "precision=fp32", "device=cpu", f"seed={seed}",
        f"trainer.max_steps={steps}", f"trainer.eval_every_n_steps={steps}", f"trainer.save_every_n_steps={steps}",
        f"trainer.log_every_n_steps={SETTINGS['log_every']}", f"trainer.clip_grad_norm={SETTINGS['clip']}",
        "trainer.monitor=val/accuracy", "trainer.monitor_mode=max",
        "logging.tensorboard=false", "logging.progress_bar=false",
    ])
    cfg.callbacks = {"clock": {"_target_": "bench_hf_trainer.StepClock", "path": str(clock_path),
                               "train_mode": train_mode}}
    result = train_model(cfg, run_dir=folder / "trainkit_run")
    return {"val_accuracy": result.metrics["val/accuracy"], "val_loss": result.metrics["val/loss"],
            "global_step": result.global_step}


def run_hf(folder: Path, steps: int, seed: int, clock_path: Path) -> dict:
    import datasets
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForSequenceClassification.from_pretrained(folder / "model")
    label2id = model.config.label2id

    def load(name: str) -> datasets.Dataset:
        table = datasets.Dataset.from_csv(str(folder / name), keep_in_memory=True)
        return table.map(lambda rows: {**tokenizer(rows["text"], truncation=True, max_length=SETTINGS["max_length"],
                                                   return_token_type_ids=False),
                                       "labels": [label2id[label] for label in rows["label"]]},
                         batched=True, remove_columns=["text", "label"], keep_in_memory=True)

    def accuracy(prediction) -> dict:
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=-1) == prediction.label_ids))}

    args = TrainingArguments(
        output_dir=str(folder / "hf_run"), use_cpu=True, report_to="none", seed=seed,
        per_device_train_batch_size=SETTINGS["batch_size"], per_device_eval_batch_size=SETTINGS["batch_size"],
        learning_rate=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"], optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=SETTINGS["clip"],
        lr_scheduler_type="constant", warmup_steps=0, max_steps=steps,
        eval_strategy="steps", eval_steps=steps, save_strategy="no",
        logging_strategy="steps", logging_steps=SETTINGS["log_every"], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=load("train.csv"), eval_dataset=load("val.csv"),
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
                      callbacks=[hf_clock(str(clock_path))])
    trainer.train()
    evaluation = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry][-1]
    decay = set(trainer.get_decay_parameter_names(model))
    matrices = {name for name, parameter in model.named_parameters() if parameter.ndim >= 2}
    return {"val_accuracy": evaluation["eval_accuracy"], "val_loss": evaluation["eval_loss"],
            "global_step": trainer.state.global_step, "decay_is_matrices": decay == matrices}


def worker(contender: str, folder: Path, steps: int, seed: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    clock_path = folder / f"clock-{contender}.json"
    runners = {"trainkit": run_trainkit, "trainkit_as_is": partial(run_trainkit, train_mode=False), "hf": run_hf}
    out = runners[contender](folder, steps, seed, clock_path)
    clock = json.loads(clock_path.read_text())
    stamps, batch = clock["steps"], SETTINGS["batch_size"]
    out.update(
        steady_samples_per_s=(len(stamps) - WARMUP) * batch / (stamps[-1] - stamps[WARMUP - 1]),
        phase_samples_per_s=len(stamps) * batch / (stamps[-1] - clock["start"]),
        median_step_ms=1000 * statistics.median(b - a for a, b in zip(stamps[WARMUP - 1:], stamps[WARMUP:])),
        setup_s=clock["start"] - STARTED, steps_timed=len(stamps), threads=torch.get_num_threads(),
    )
    print(json.dumps(out))


# The comparison (the parent process) ------------------------------------------------------
def measure(contender: str, folder: Path, steps: int, seed: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TRAINKIT_CACHE": str(folder / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(folder / "hf_datasets_cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--worker", contender, str(folder), "--steps", str(steps),
               "--seed", str(seed), "--threads", str(threads)]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{contender} worker failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def spread(values: list[float], digits: int = 0) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def table(runs: dict[str, list[dict]], info: dict, steps: int, threads: int) -> str:
    rounds = min(len(rows) for rows in runs.values())
    lines = [
        f"BERT {MODEL['hidden_size']}x{MODEL['num_hidden_layers']} ({info['parameters']:,} parameters, vocabulary "
        f"{info['vocab_size']}), batch {SETTINGS['batch_size']}, {steps} steps, {threads} thread(s), "
        f"{rounds} rounds; median (min-max):",
        "",
        "| contender | samples/s after step 10 | samples/s, whole training phase | median step | set-up to loop start "
        "| process wall | val accuracy (per round) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in runs.items():
        accuracies = ", ".join(f"{r['val_accuracy']:.3f}" for r in rows)
        lines.append(f"| {CONTENDERS[name]} | {spread([r['steady_samples_per_s'] for r in rows])} "
                     f"| {spread([r['phase_samples_per_s'] for r in rows])} "
                     f"| {spread([r['median_step_ms'] for r in rows], 2)} ms | {spread([r['setup_s'] for r in rows], 1)} s "
                     f"| {spread([r['process_s'] for r in rows], 1)} s | {accuracies} |")
    lines.append("")
    for name in (n for n in runs if n != "hf" and "hf" in runs):
        pairs = list(zip(runs[name], runs["hf"]))
        steady = [a["steady_samples_per_s"] / b["steady_samples_per_s"] for a, b in pairs]
        phase = [a["phase_samples_per_s"] / b["phase_samples_per_s"] for a, b in pairs]
        lines.append(f"{name}/hf samples/s per round, after step 10: {', '.join(f'{r:.3f}' for r in steady)} "
                     f"(median **{statistics.median(steady):.3f}**); whole phase: "
                     f"{', '.join(f'{r:.3f}' for r in phase)} (median {statistics.median(phase):.3f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "SETUP_DIR"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (dropout, batch order); "
                        "round r of the comparison uses seed r, the same for every contender")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every run (every contender)")
    parser.add_argument("--contenders", nargs="+", default=["trainkit", "hf"], choices=list(CONTENDERS))
    parser.add_argument("--json", help="write the runs here too")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.steps, args.seed, args.threads)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as name:
        folder = Path(name)
        info = prepare(folder)
        runs: dict[str, list[dict]] = {contender: [] for contender in args.contenders}
        for round_index in range(args.rounds):
            for contender in args.contenders:
                result = measure(contender, folder, args.steps, round_index, args.threads)
                runs[contender].append(result)
                print(json.dumps({"round": round_index, "contender": contender, **result}), flush=True)
    print()
    print(table(runs, info, args.steps, args.threads))
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "settings": SETTINGS, "model": MODEL, "runs": runs},
                                              indent=2))


if __name__ == "__main__":
    main()
