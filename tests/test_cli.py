"""One subprocess test per command, run the way a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

QUICK = ["+experiment=digits_mlp", "trainer.max_epochs=2"]


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.glob("outputs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_version_and_help_do_not_import_torch():
    code = ("import sys; from trainkit.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("trainkit ")


def test_python_dash_m_matches_console_script(cli):
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("trainkit 0.")
    out = cli("--help")
    assert out.returncode == 0 and "train" in out.stdout and "translate" in out.stdout


def test_unknown_command_suggests(cli):
    out = cli("trian")
    assert out.returncode == 2 and "did you mean train" in out.stderr


def test_train_eval_and_outputs(cli, tmp_path):
    out = cli("train", *QUICK)
    assert out.returncode == 0, out.stderr
    run = only_run_dir(tmp_path)
    for name in (".hydra", "train.log", "metrics.jsonl", "tb", "checkpoints/last.pt", "checkpoints/best.pt", "result.json"):
        assert (run / name).exists(), name
    assert "validation" in (run / "train.log").read_text()
    assert "\r" not in (run / "train.log").read_text()
    best = run / "checkpoints/best.pt"
    out = cli("eval", f"ckpt={best}", "split=test")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    summary = json.loads((run / "result.json").read_text())
    assert metrics["test/accuracy"] == summary["test"]["test/accuracy"]  # a ratio of counts: exact
    assert (run / "eval-test.json").exists()


def test_cfg_job_and_hydra_help(cli, tmp_path):
    out = cli("train", "+experiment=digits_mlp", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "max_epochs: 30" in out.stdout and not (tmp_path / "outputs").exists()
    out = cli("train", "--help")
    assert out.returncode == 0, out.stderr
    groups = dict(line.split(": ", 1) for line in out.stdout.split("== Config ==")[0].splitlines() if ": " in line)
    assert {"mlp", "transformer", "vae"} <= set(groups["model"].split(", "))
    assert {"fp32", "bf16", "fp16", "fp64"} <= set(groups["precision"].split(", "))


def test_typo_on_command_line_names_the_key(cli, tmp_path):
    out = cli("train", "+experiment=digits_mlp", "trainer.max_epocs=3")
    assert out.returncode == 2
    assert "trainer.max_epochs" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_typo_in_experiment_yaml_names_the_key_and_file(cli, tmp_path):
    conf = tmp_path / "myconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - digits_mlp\ntrainer:\n  max_epocs: 3\n")
    out = cli("train", "--config-dir", str(tmp_path / "myconf"), "+experiment=mine")
    assert out.returncode == 2
    assert "trainer.max_epochs" in out.stderr and "experiment/mine" in out.stderr


def test_wrong_constructor_argument_uses_the_signature(cli):
    out = cli("train", "+experiment=digits_mlp", "+model.hiden=3")
    assert out.returncode == 2 and "model.hidden_sizes" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", "+experiment=digits_mlp", "optimizer.betaz=[0.9,0.9]")
    assert out.returncode == 2 and "optimizer.betas" in out.stderr


def test_user_config_dir_with_own_model(cli, tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text(
        "import torch\n\nclass Linear(torch.nn.Module):\n"
        "    def __init__(self, in_features, out_features):\n"
        "        super().__init__()\n        self.layer = torch.nn.Linear(in_features, out_features)\n\n"
        "    def forward(self, x):\n        return self.layer(x)\n")
    conf = tmp_path / "myconf"
    (conf / "model").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "model" / "linear.yaml").write_text("_target_: mypkg.Linear\n")
    (conf / "experiment" / "linear_digits.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: linear\nname: linear_digits\n"
        "optimizer:\n  lr: 0.02\ntrainer:\n  max_epochs: 3\n  monitor: val/accuracy\n  monitor_mode: max\n")
    out = cli("train", "--config-dir", str(conf), "+experiment=linear_digits",
              env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert json.loads((only_run_dir(tmp_path) / "result.json").read_text())["best_metric"] > 0.8


def test_validate_reports_every_problem(cli):
    out = cli("validate", "+experiment=digits_mlp")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    out = cli("validate", "+experiment=digits_mlp", "+model.hiden=3", "+optimizer.betaz=1",
              "trainer.grad_accum_steps=0")
    assert out.returncode == 2
    for expected in ("model.hidden_sizes", "optimizer.betas", "trainer.grad_accum_steps"):
        assert expected in out.stderr


def test_eval_without_ckpt_and_with_a_bad_one(cli, tmp_path):
    out = cli("eval")
    assert out.returncode == 2 and "ckpt=" in out.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = cli("eval", f"ckpt={bad}")
    assert out.returncode == 2 and "bad.pt" in out.stderr and "Traceback" not in out.stderr


def test_a_checkpoint_that_would_run_code_is_refused(cli, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Exploit(), "config": "x: 1"}, evil)
    out = cli("eval", f"ckpt={evil}")
    assert out.returncode == 2 and "refused" in out.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_nmt_tiny_trains_resumes_and_translates(cli, tmp_path):
    out = cli("train", "+experiment=nmt_tiny", "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 9}")
    assert out.returncode == 75, out.stderr
    out = cli("train", "+experiment=nmt_tiny", "resume=auto")
    assert out.returncode == 0, out.stderr
    out = cli("train", "+experiment=nmt_tiny", "hydra.run.dir=outputs/whole")
    assert out.returncode == 0, out.stderr
    runs = sorted((tmp_path / "outputs" / "nmt_tiny").iterdir())
    resumed = torch.load(runs[-1] / "checkpoints/last.pt", weights_only=True)["model"]
    whole = torch.load(tmp_path / "outputs/whole/checkpoints/last.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    best = tmp_path / "outputs/whole/checkpoints/best.pt"
    out = cli("translate", f"ckpt={best}", "beam=2", stdin="four hundred and two\n\nseven\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2]
    out = cli("eval", f"ckpt={best}", "split=test")
    assert out.returncode == 0, out.stderr
    assert {"test/bleu", "test/exact_match", "test/loss"} <= set(json.loads(out.stdout))
