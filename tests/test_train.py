"""In-process training: outputs, checkpoints, and the equivalences the loop promises."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core import checkpoint
from trainkit.core.errors import Preempted

DIGITS = ["+experiment=digits_mlp", "logging.progress_bar=false"]


def run(compose, tmp_path, name, *overrides):
    cfg = compose([*DIGITS, *overrides])
    return train_model(cfg, run_dir=tmp_path / name)


def test_digits_run_leaves_every_output(compose, tmp_path):
    result = run(compose, tmp_path, "run", "trainer.max_epochs=2")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"metrics.jsonl", "tb", "checkpoints", "result.json"} <= files
    summary = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("monitor", "best_metric", "final", "test", "global_step", "epoch", "wall_time_s", "throughput"):
        assert key in summary
    assert summary["monitor"] == "val/accuracy" and "val/accuracy" in summary["final"]
    assert "test/accuracy" in summary["test"] and summary["epoch"] == 2
    assert result.best_metric == max(h["val/accuracy"] for h in result.history)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in e and "epoch" in e for e in events)
    logged = set().union(*events)
    assert {"train/loss", "train/learning_rate", "train/epoch_loss", "val/loss", "val/epoch_loss",
            "val/accuracy", "train/grad_norm", "train/samples_per_second"} <= logged


def test_checkpoint_is_plain_and_complete(compose, tmp_path):
    run(compose, tmp_path, "run", "trainer.max_epochs=1")
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "run" / "checkpoints" / name, weights_only=True)
        assert set(checkpoint.REQUIRED_KEYS) <= set(state)
        assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])
        assert {"epoch", "global_step", "batch_in_epoch", "best_metric"} <= set(state["trainer_state"])
        assert isinstance(state["config"], str) and "digits_mlp" in state["config"]


def test_two_seeded_runs_are_identical(compose, tmp_path):
    run(compose, tmp_path, "a", "trainer.max_steps=30")
    run(compose, tmp_path, "b", "trainer.max_steps=30")
    assert_same_weights(load_weights(tmp_path / "a/checkpoints/last.pt"), load_weights(tmp_path / "b/checkpoints/last.pt"))


def test_different_seeds_differ(compose, tmp_path):
    run(compose, tmp_path, "a", "trainer.max_steps=25")
    run(compose, tmp_path, "b", "trainer.max_steps=25", "seed=1")
    a, b = load_weights(tmp_path / "a/checkpoints/last.pt"), load_weights(tmp_path / "b/checkpoints/last.pt")
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_accumulation_equals_large_batch(compose, tmp_path):
    # 1,259 training samples: 39 full steps and a last short one per epoch, crossed twice.
    # float64: summation order is the only difference, far below the 1e-10 tolerance.
    common = ["data.shuffle=false", "model.dropout=0", "trainer.max_steps=90", "optimizer=sgd",
              "optimizer.lr=0.05", "precision=fp64"]
    run(compose, tmp_path, "accum", *common, "data.batch_size=8", "trainer.grad_accum_steps=4")
    run(compose, tmp_path, "large", *common, "data.batch_size=32")
    accumulated = load_weights(tmp_path / "accum/checkpoints/last.pt")
    assert {weight.dtype for weight in accumulated.values()} == {torch.float64}
    assert_same_weights(accumulated, load_weights(tmp_path / "large/checkpoints/last.pt"), atol=1e-10)


@pytest.mark.parametrize("stop_step", [13, 40], ids=["mid-epoch", "epoch-boundary"])
def test_resume_is_bitwise_exact(compose, tmp_path, stop_step):
    # 1,259 samples / batch 64 = 20 steps an epoch: step 40 is a boundary, 13 is not.
    common = ["trainer.max_epochs=3", "model.dropout=0.3", "trainer.log_every_n_steps=7"]
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common,
            f"+callbacks.stop={{_target_: trainkit.callbacks.StopAt, step: {stop_step}}}")
    stopped = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)
    assert stopped["trainer_state"]["global_step"] == stop_step
    assert stopped["trainer_state"]["batch_in_epoch"] == (stop_step - 1) % 20 + 1
    run(compose, tmp_path, "second", *common, "resume=auto")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))
    whole = json.loads((tmp_path / "whole/result.json").read_text())
    second = json.loads((tmp_path / "second/result.json").read_text())
    assert whole["final"] == second["final"] and whole["best_metric"] == second["best_metric"]


@pytest.mark.slow
def test_worker_processes_change_nothing_and_resume_exactly(compose, tmp_path):
    """data.num_workers=2 with pin_memory (persistent workers): stopped mid-epoch and
    resumed, the run ends with the same weights as an uninterrupted run without workers."""
    common = ["trainer.max_epochs=2", "model.dropout=0.3"]
    workers = ["data.num_workers=2", "data.pin_memory=true"]
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common, *workers, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 13}")
    run(compose, tmp_path, "second", *common, *workers, "resume=auto")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))


@pytest.mark.slow
def test_translation_batches_built_in_workers_are_the_same(compose, tmp_path):
    results = []
    for workers in (0, 2):
        cfg = compose(["+experiment=nmt_tiny", "trainer.max_steps=6", "scheduler.warmup_steps=2",
                       "trainer.test_after_fit=false", "logging.progress_bar=false", f"data.num_workers={workers}"])
        results.append(train_model(cfg, run_dir=tmp_path / f"workers-{workers}"))
    assert_same_weights(load_weights(tmp_path / "workers-0/checkpoints/last.pt"),
                        load_weights(tmp_path / "workers-2/checkpoints/last.pt"))
    assert results[0].metrics == results[1].metrics


def test_resume_with_accumulation_and_step_checkpoints(compose, tmp_path):
    common = ["trainer.max_steps=25", "trainer.grad_accum_steps=3", "trainer.save_every_n_steps=4",
              "trainer.eval_every_n_steps=6", "scheduler=cosine", "scheduler.warmup_steps=5"]
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 9}")
    run(compose, tmp_path, "second", *common, f"resume={tmp_path / 'first/checkpoints/last.pt'}")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))


def cosine(step, base, warmup, total, min_lr):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def noam(step, d_model, warmup, factor):
    n = step + 1
    return factor * d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)


def learning_rates(tmp_path, name):
    events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["train/learning_rate"] for e in events if "train/learning_rate" in e}


def test_cosine_schedule_matches_formula_over_the_run(compose, tmp_path):
    run(compose, tmp_path, "cos", "scheduler=cosine", "scheduler.warmup_steps=10", "scheduler.min_lr=1e-5",
        "optimizer.lr=3e-3", "trainer.max_steps=60", "trainer.log_every_n_steps=1")
    logged = learning_rates(tmp_path, "cos")
    assert sorted(logged) == list(range(1, 61))
    for step, lr in logged.items():  # the rate logged after `step` steps is the next step's
        assert abs(lr - cosine(step, 3e-3, 10, 60, 1e-5)) <= 1e-12


def test_noam_schedule_matches_formula_over_the_run(compose, tmp_path):
    from trainkit.schedulers import Noam

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    scheduler = Noam(optimizer, d_model=128, warmup_steps=50, factor=2.0)
    for step in range(400):
        assert abs(optimizer.param_groups[0]["lr"] - noam(step, 128, 50, 2.0)) <= 1e-12
        optimizer.step()
        scheduler.step()


def test_plateau_scheduler_steps_on_the_monitored_metric(compose, tmp_path):
    """patience=0: the rate halves right after each evaluation whose val/accuracy (the
    monitor, mode max) is not above the best so far by the relative threshold, and only then."""
    run(compose, tmp_path, "plateau", "scheduler=plateau", "scheduler.patience=0", "scheduler.factor=0.5",
        "scheduler.threshold=1e-4", "trainer.max_steps=80", "trainer.eval_every_n_steps=5", "optimizer=sgd",
        "optimizer.lr=1.0", "trainer.log_every_n_steps=1")
    lrs = learning_rates(tmp_path, "plateau")  # the rate logged after `step` steps is the next step's
    events = [json.loads(line) for line in (tmp_path / "plateau/metrics.jsonl").read_text().splitlines()]
    evaluations = {e["step"]: e["val/accuracy"] for e in events if "val/accuracy" in e}
    assert sorted(lrs) == list(range(1, 81)) and sorted(evaluations) == list(range(5, 81, 5))
    best, improved, stalled = -math.inf, [], []
    for step, accuracy in evaluations.items():
        if accuracy > best * (1 + 1e-4):  # ReduceLROnPlateau's rule for mode max, threshold_mode rel
            best = accuracy
            improved.append(step)
        else:
            stalled.append(step)
    assert len(stalled) >= 2 and max(improved) > min(stalled)  # stalls, and improvements after one
    for step in range(1, 80):
        assert lrs[step + 1] == lrs[step] * (0.5 if step in stalled else 1.0), f"after step {step}"


def test_early_stopping(compose, tmp_path):
    result = run(compose, tmp_path, "es", "trainer.max_epochs=50", "optimizer.lr=0",
                 "trainer.early_stopping_patience=2", "scheduler=none")
    assert result.stop_reason == "early_stopping" and result.epoch == 3


def test_regression_preset_reports_r2(compose, tmp_path):
    cfg = compose(["+experiment=diabetes_mlp", "trainer.max_epochs=20", "logging.progress_bar=false"])
    result = train_model(cfg, run_dir=tmp_path / "reg")
    assert "val/r2" in result.metrics and "test/r2" in result.test
    assert result.best_metric > 0.2  # a linear fit of this set reaches ~0.45


def test_top_k_checkpoints_are_kept(compose, tmp_path):
    run(compose, tmp_path, "topk", "trainer.max_epochs=5", "trainer.save_top_k=2")
    names = sorted(p.name for p in (tmp_path / "topk/checkpoints").glob("top-*.pt"))
    assert len(names) == 2


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_trains(compose, tmp_path, precision, dtype):
    """Autocast runs every training-step Linear in the reduced dtype; fp16's scaler scales
    the loss (bf16 has none); the run still learns."""
    output_dtypes, head_grads = [], []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training and output.requires_grad:
            output_dtypes.append(output.dtype)
            if module.out_features == 10:  # the head: the gradient of the 10 digit logits
                output.register_hook(lambda grad: head_grads.append(float(grad.abs().max())))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        result = run(compose, tmp_path, precision, f"precision={precision}", "trainer.max_epochs=3")
    finally:
        hook.remove()
    assert result.best_metric > 0.8
    assert len(output_dtypes) == 3 * 60 and set(output_dtypes) == {dtype}  # 3 Linears, 20 steps x 3 epochs
    # The step's loss is a sum divided by the batch's count, so an unscaled gradient of a
    # logit is at most 1/43 (the smallest batch); fp16 multiplies it by the loss scale.
    scaler = torch.load(tmp_path / precision / "checkpoints/last.pt", weights_only=True)["scaler"]
    if precision == "fp16":
        assert scaler.get("scale", 1.0) >= 2.0**10 and max(head_grads) > 1.0
    else:
        assert scaler == {} and max(head_grads) < 1 / 43 + 1e-2


def test_fp64_trains_the_optimizers_own_parameters_in_float64():
    """precision=fp64 casts the model in place after the optimizer was built: the optimizer
    holds the model's parameters and its state is float64; integer buffers stay integers;
    float32 batches are cast (into float64 weights they would raise)."""
    from torch import nn

    from trainkit import Trainer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(), precision="fp64", max_epochs=1)
    trainer.fit(data, val_loader=data)
    parameters = list(model.parameters())
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], parameters, strict=True))
    assert {p.dtype for p in parameters} == {torch.float64}
    assert {t.dtype for state in optimizer.state.values() for k, t in state.items() if k != "step"} == {torch.float64}
    assert len(optimizer.state) == len(parameters)  # every parameter was stepped
    assert model[1].running_mean.dtype == torch.float64 and model[1].num_batches_tracked.dtype == torch.int64
    assert int(model[1].num_batches_tracked) == 3


def test_fp64_batches_and_refusals(compose, tmp_path):
    from collections import namedtuple

    from trainkit.core.errors import ConfigError
    from trainkit.core.precision import Precision

    cpu = torch.device("cpu")
    Pair = namedtuple("Pair", "features count")
    batch = {"a": [torch.ones(2), torch.arange(2)], "b": (torch.ones(1, dtype=torch.float16), "text"),
             "c": Pair(torch.ones(1), 3)}
    cast = Precision(cpu, param_dtype="float64").prepare_batch(batch)
    assert cast["a"][0].dtype == cast["b"][0].dtype == cast["c"].features.dtype == torch.float64
    assert cast["a"][1].dtype == torch.int64 and cast["b"][1] == "text" and cast["c"].count == 3
    assert isinstance(cast["a"], list) and isinstance(cast["b"], tuple) and type(cast["c"]) is Pair
    plain = Precision(cpu)
    assert plain.prepare_batch(batch) is batch  # fp32: the batch itself, nothing copied
    model = torch.nn.Linear(2, 2)
    assert plain.prepare_model(model) is model and model.weight.dtype == torch.float32
    with pytest.raises(ConfigError, match="param_dtype=float64 with precision.autocast_dtype=bfloat16"):
        run(compose, tmp_path, "mixed", "precision=fp64", "precision.autocast_dtype=bfloat16")
    with pytest.raises(ConfigError, match="precision.param_dtype='float8'"):
        Precision(cpu, param_dtype="float8")


def test_callback_state_is_saved_and_restored(compose, tmp_path):
    count = "+callbacks.count={_target_: probe_helpers.CountSteps}"
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", count, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 7}")
    state = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)
    assert state["callbacks"]["count"] == {"steps": 7}
    run(compose, tmp_path, "second", count, "trainer.max_epochs=1", "resume=auto")
    final = torch.load(tmp_path / "second/checkpoints/last.pt", weights_only=True)
    assert final["callbacks"]["count"] == {"steps": 20}  # 7 before the stop + 13 after


def test_a_submodule_frozen_in_eval_mode_stays_frozen(tmp_path):
    """Training steps and evaluations leave each submodule's mode as the user set it: a
    batch-norm layer put in eval mode keeps its running statistics, dropout still trains."""
    from torch import nn

    from trainkit import Trainer
    from trainkit.callbacks import Callback

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2))
    model[2].eval()
    seen = []

    class Record(Callback):
        def on_step_end(self, trainer) -> None:
            seen.append((model.training, model[1].training, model[2].training))

    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(4)]
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=2,
                      callbacks=[Record()], log_every_n_steps=1)
    trainer.fit(data, val_loader=data)
    assert seen == [(True, True, False)] * 8
    assert torch.equal(model[2].running_mean, torch.zeros(8)) and model.training and not model[2].training


def test_a_model_left_in_eval_mode_is_trained_in_train_mode(tmp_path):
    from torch import nn

    from trainkit import Trainer
    from trainkit.callbacks import Callback

    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    seen = []

    class EvalEachStep(Callback):  # a careless callback: evaluates and leaves the model in eval mode
        def on_step_end(self, trainer) -> None:
            seen.append(model[1].training)
            trainer.model.eval()

    data = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(3)]
    model.eval()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=1,
            callbacks=[EvalEachStep()]).fit(data)
    assert seen == [True, True, True]


def test_loss_meter_sums_windows_and_epochs_exactly():
    from trainkit.core.ranks import Dist
    from trainkit.engine.meter import LossMeter

    dist = Dist(device=torch.device("cpu"))
    meter = LossMeter(torch.device("cpu"))
    for value in (1.0, 2.0, 3.0):
        meter.add(torch.tensor(value), 1, {"kl": torch.tensor(value / 2)})
    assert meter.read(dist) == ({"train/loss": 2.0, "train/loss/kl": 1.0}, 3.0)
    meter.add(torch.tensor(10.0), 2)
    assert meter.read_epoch(dist) == 16 / 5  # every step of the epoch, read window or not
    meter.add(torch.tensor(4.0, dtype=torch.float16), 2)
    assert meter.read(dist) == ({"train/loss": 14 / 4}, 4.0)  # this window spans the epoch's end
    assert meter.read_epoch(dist) == 4 / 2
    assert meter.read(dist) == ({"train/loss": 0.0}, 0.0)


def test_loss_meter_keeps_bounded_memory_over_long_windows():
    from trainkit.core.ranks import Dist
    from trainkit.engine.meter import LossMeter

    meter = LossMeter(torch.device("cpu"))
    for _ in range(5000):
        meter.add(torch.tensor(0.5), 1)
    assert len(meter.pending) < 1024
    assert meter.read(Dist(device=torch.device("cpu"))) == ({"train/loss": 0.5}, 5000.0)
