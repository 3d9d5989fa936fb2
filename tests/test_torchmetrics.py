"""Metrics named by ``_target_`` in ``task.metrics`` (torchmetrics): their values in result.json
equal torchmetrics on the same predictions, their keys are checked with the closest name,
torchmetrics is imported at the first evaluation that uses one and never at start-up, and 2
ranks with uneven validation shards give the one-process value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torchmetrics.functional as tmf  # in .[dev]: a missing install fails here instead of skipping
from conftest import load_weights, subprocess_env, train_runs
from test_ddp_exact import kill_group, start
from torch import nn

from trainkit.core.errors import ConfigError
from trainkit.metrics import TORCHMETRICS_KWARGS
from trainkit.tasks import ClassificationTask, RegressionTask

QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]
DIGITS = ["+experiment=digits_mlp", "trainer.max_steps=3", "scheduler.warmup_steps=1", *QUIET]
DIABETES = ["+experiment=diabetes_mlp", "trainer.max_steps=3", "scheduler.warmup_steps=1", *QUIET]
AUROC = "{auroc: {_target_: torchmetrics.classification.MulticlassAUROC}}"
F1 = "{f1: {_target_: torchmetrics.classification.MulticlassF1Score, average: macro}}"


def predictions(overrides: list[str], checkpoint, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs of a checkpoint's model on a whole split, in one process, and the targets."""
    from trainkit.cli import compose
    from trainkit.run.build import build

    cfg = compose(overrides)
    parts = build(cfg, cfg.seed)
    parts.model.load_state_dict(load_weights(checkpoint))
    parts.model.eval()
    with torch.no_grad():
        pairs = [(parts.model(inputs), targets) for inputs, targets in parts.data.loader(split)]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def test_torchmetrics_metrics_by_target_reach_result_json_with_torchmetrics_values(tmp_path):
    digits = [*DIGITS, f"task.metrics=[accuracy,{AUROC}]"]
    diabetes = [*DIABETES, "task.metrics=[r2,{tm_mse: {_target_: torchmetrics.MeanSquaredError}},"
                           "{tm_r2: {_target_: torchmetrics.R2Score}}]"]
    checkpoints = train_runs(tmp_path, {"digits": digits, "diabetes": diabetes})
    for name, overrides in (("digits", digits), ("diabetes", diabetes)):
        result = json.loads((tmp_path / name / "result.json").read_text())
        # One validation, at the last step: best.pt (tested) and last.pt (final) hold the same weights.
        for split, values in (("val", result["final"]), ("test", result["test"])):
            output, targets = predictions(overrides, checkpoints[name], split)
            if name == "digits":
                assert values[f"{split}/auroc"] == pytest.approx(
                    float(tmf.classification.multiclass_auroc(output, targets, num_classes=10)), rel=1e-6)
                # The short name is still trainkit's own accuracy.
                assert values[f"{split}/accuracy"] == pytest.approx(float((output.argmax(-1) == targets).double().mean()))
            else:
                output, targets = output.squeeze(-1), targets.squeeze(-1)
                assert values[f"{split}/tm_mse"] == pytest.approx(float(tmf.mean_squared_error(output, targets)), rel=1e-5)
                assert values[f"{split}/tm_r2"] == pytest.approx(float(tmf.r2_score(output, targets)), abs=1e-6)
                assert values[f"{split}/r2"] == pytest.approx(values[f"{split}/tm_r2"], abs=1e-6)  # float64 vs float32


def test_a_mapping_and_runtime_values_build_torchmetrics_classes():
    task = ClassificationTask(nn.CrossEntropyLoss(), num_classes=4, metrics={
        "top": "accuracy", "acc": {"_target_": "torchmetrics.Accuracy"}, "off": None,
        "auroc": {"_target_": "torchmetrics.classification.MulticlassAUROC", "average": "weighted"}})
    output, targets = torch.randn(30, 4), torch.arange(30) % 4
    for _ in range(2):  # the second evaluation starts from reset states
        task.eval_start(torch.device("cpu"))
        task.update_metrics(output, targets)
        values = task.eval_metrics(0.0)
    assert list(values) == ["top", "acc", "auroc"]
    assert task.metrics["acc"].num_classes == 4 and task.metrics["auroc"].num_classes == 4  # from the data
    assert values["acc"] == pytest.approx(values["top"])
    assert values["auroc"] == pytest.approx(float(tmf.classification.multiclass_auroc(
        output, targets, num_classes=4, average="weighted")))


@pytest.mark.parametrize("metrics, message", [
    ({"auroc": {"_target_": "torchmetrics.classification.MulticlassAUROC", "num_clases": 4}},
     "task.metrics.auroc.num_clases: not an argument of torchmetrics.classification.MulticlassAUROC; "
     "did you mean task.metrics.auroc.num_classes?"),
    ({"auroc": {"_target_": "torchmetrics.classification.MulticlassAUROC", "sync_on_compute": False}},
     "task.metrics.auroc.sync_on_compute=false"),
    ({"per_class": {"_target_": "torchmetrics.classification.MulticlassAUROC", "average": "none"}},
     "task.metrics.per_class: compute() gave (4,), not one number"),
    ({"identity": {"_target_": "torch.nn.Identity"}}, "task.metrics.identity: torch.nn.Identity gave a Identity, "
                                                      "not a torchmetrics.Metric"),
])
def test_a_bad_torchmetrics_node_is_a_config_error_at_the_first_evaluation(metrics, message):
    task = ClassificationTask(nn.CrossEntropyLoss(), num_classes=4, metrics=metrics)
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        task.eval_start(torch.device("cpu"))
        task.update_metrics(torch.randn(8, 4), torch.arange(8) % 4)
        task.eval_metrics(0.0)


@pytest.mark.parametrize("metrics, message", [
    (["acuracy"], "unknown classification metric 'acuracy'; did you mean accuracy?"),
    ([{"auroc": {"num_classes": 4}}], "task.metrics.auroc: expected a short name"),
    (["accuracy", {"accuracy": {"_target_": "torchmetrics.Accuracy"}}], "task.metrics.accuracy: named twice"),
    ("accuracy", "task.metrics='accuracy': expected a list of names"),
])
def test_bad_metric_names_fail_when_the_task_is_built(metrics, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        ClassificationTask(nn.CrossEntropyLoss(), num_classes=4, metrics=metrics)


def test_short_names_and_regression_runtime_are_unchanged():
    task = RegressionTask(nn.MSELoss(), metrics=["mse", {"tm": {"_target_": "torchmetrics.MeanSquaredError"}}],
                          out_features=2)
    output, targets = torch.randn(10, 2), torch.randn(10, 2)
    task.eval_start(torch.device("cpu"))
    task.update_metrics(output, targets)
    values = task.eval_metrics(0.0)
    assert type(task.metrics["mse"]).__module__ == "trainkit.metrics"
    assert task.metrics["tm"].num_outputs == 1  # not out_features: that would give one value per column
    assert values["mse"] == pytest.approx(float(((output - targets) ** 2).mean()), rel=1e-6)
    assert values["tm"] == pytest.approx(values["mse"], rel=1e-6)


PROBE = """
import json, sys
from pathlib import Path
from trainkit import train_model
from trainkit.cli import compose
from trainkit.run.build import build

plain = {plain!r}
with_auroc = plain + [{metrics!r}]
seen = {{}}
cfg = compose(with_auroc)
build(cfg, cfg.seed)
seen["built with auroc"] = "torchmetrics" in sys.modules
train_model(compose(plain), run_dir=Path("plain"))
seen["plain run"] = "torchmetrics" in sys.modules
train_model(cfg, run_dir=Path("auroc"))
seen["auroc run"] = "torchmetrics" in sys.modules
print(json.dumps(seen))
"""


def test_torchmetrics_is_imported_at_the_first_evaluation_that_uses_it_only(tmp_path):
    script = PROBE.format(plain=DIGITS, metrics=f"task.metrics=[accuracy,{AUROC}]")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == {"built with auroc": False, "plain run": False, "auroc run": True}
    version = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainkit", "--version"], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "| trainkit\n" in version.stderr  # the probe sees trainkit's imports
    assert "torchmetrics" not in version.stderr


def test_the_keyword_arguments_every_metric_takes_are_those_of_torchmetrics_metric():
    import inspect
    import re

    import torchmetrics

    source = inspect.getsource(torchmetrics.Metric.__init__)
    assert set(re.findall(r"kwargs\.pop\(\"(\w+)\"", source)) == set(TORCHMETRICS_KWARGS)


def test_an_unknown_key_stops_a_run_with_exit_code_2(cli):
    out = cli("train", *DIGITS, "task.metrics=[accuracy,{auroc: {_target_: torchmetrics.classification."
                                "MulticlassAUROC, averge: macro}}]")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "task.metrics.auroc.averge: not an argument" in out.stderr
    assert "did you mean task.metrics.auroc.average?" in out.stderr


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_with_uneven_shards_give_the_one_process_torchmetrics_value(cli, tmp_path):
    from trainkit.data import ArrayData

    shards = [sum(len(targets) for _, targets in ArrayData("digits", rank=rank, world_size=2).loader("val"))
              for rank in (0, 1)]
    assert shards[0] != shards[1], shards  # uneven: the gathered AUROC states differ in length
    overrides = [*DIGITS, f"task.metrics=[accuracy,{AUROC},{F1}]"]
    job = start(cli, *overrides, "distributed.nproc_per_node=2", "hydra.run.dir=outputs/ddp")
    try:
        _, stderr = job.communicate(timeout=120)  # a rank left out of a metric's sync: the job hangs
    finally:
        kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    final = json.loads((tmp_path / "outputs/ddp/result.json").read_text())["final"]
    output, targets = predictions(DIGITS, tmp_path / "outputs/ddp/checkpoints/last.pt", "val")
    # Exactly: AUROC gathers every rank's predictions (sorted, so their order does not matter),
    # F1 sums counts.
    assert final["val/auroc"] == float(tmf.classification.multiclass_auroc(output, targets, num_classes=10))
    assert final["val/f1"] == float(tmf.classification.multiclass_f1_score(output, targets, num_classes=10,
                                                                            average="macro"))
