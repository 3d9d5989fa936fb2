"""Wrong inputs, one table: each exits 2 with one message naming the key, value, file or line.

Every case runs ``python -m trainkit ...`` in a folder that already holds one good earlier run
(trained once per module). After each case that earlier run must be byte-for-byte unchanged,
and no new run directory may hold checkpoints or a result.json. A new, checkpoint-free run
directory left behind by a failed case is tolerated but reported as a warning
("left a run directory"). No traceback unless ``HYDRA_FULL_ERROR=1`` (its own test below).

A disk-full error while saving is tested in-process: the previous last.pt must survive. The
dry forward that finds misfits at build time must leave every RNG and training flag as it found
them (a run with it equals a run without it), and a warm-up longer than the run is shortened
with a warning instead of refused.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Cli

GOOD_TSV = "one\teins\ntwo\tzwei\nthree\tdrei\nfour\tvier\n"
# digits cases stop after two optimizer steps should a case wrongly get as far as training
DIGITS = ["train", "+experiment=digits_mlp", "trainer.max_steps=2", "scheduler=none"]
NMT_TSV = ["train", "+experiment=nmt_tiny", "data=tsv", "trainer.max_steps=2", "scheduler=none"]
NMT_TINY = ["train", "+experiment=nmt_tiny", "trainer.max_steps=2"]
DIABETES = ["train", "+experiment=diabetes_mlp", "trainer.max_steps=2"]
VAE = ["train", "+experiment=digits_vae", "trainer.max_steps=2", "scheduler=none"]


# shared earlier run ------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root/outputs, by relative path."""
    outputs = root / "outputs"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(outputs.rglob("*")) if p.is_file()}


def run_dirs(root: Path) -> set[Path]:
    return {p for pattern in ("outputs/*/*", "multirun/*/*") for p in root.glob(pattern) if p.is_dir()}


@dataclass
class Earlier:
    root: Path  # cwd of every case
    run: Path  # the good run directory
    files: dict[str, str]  # its files and their hashes
    dirs: set[Path]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Earlier:
    root = tmp_path_factory.mktemp("shared")
    out = Cli(root)("train", "+experiment=digits_mlp", "trainer.max_epochs=1", stdin="")
    assert out.returncode == 0, out.stderr
    dirs = run_dirs(root)
    assert len(dirs) == 1, dirs
    run = next(iter(dirs))
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "result.json").is_file()
    return Earlier(root, run, snapshot(root), dirs)


def check_nothing_changed(earlier: Earlier, case_id: str) -> None:
    assert snapshot_of_earlier(earlier) == earlier.files, "the earlier run directory changed"
    new = sorted(run_dirs(earlier.root) - earlier.dirs)
    for directory in new:
        written = [p for p in ("checkpoints", "result.json") if (directory / p).exists()]
        contents = sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
        shutil.rmtree(directory)  # keep the shared folder as the next case expects it
        assert not written, f"a new run directory {directory} holds {written}"
        warnings.warn(f"{case_id}: left a run directory {directory.relative_to(earlier.root)} "
                      f"holding {contents}", stacklevel=1)


def snapshot_of_earlier(earlier: Earlier) -> dict[str, str]:
    """Files of the earlier state only (new run directories are checked separately)."""
    current = snapshot(earlier.root)
    earlier_run = str(earlier.run.relative_to(earlier.root))
    return {k: v for k, v in current.items() if k in earlier.files or k.startswith(earlier_run + os.sep)}


# fixture files -----------------------------------------------------------------------------------
class Touch:
    """Unpickling this creates a file: a checkpoint holding it must be refused, unopened."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def torch_bytes(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def truncated_checkpoint(run: Path, tmp: Path) -> bytes:
    data = (run / "checkpoints" / "last.pt").read_bytes()
    return data[: len(data) // 2]


def evil_checkpoint(run: Path, tmp: Path) -> bytes:
    return torch_bytes({"model": {}, "config": "name: x\n", "payload": Touch(tmp / "pwned")})


def plain_checkpoint(run: Path, tmp: Path) -> bytes:
    return torch_bytes({"weights": torch.zeros(3)})


# Each case: id, argv (``{tmp}``: this case's input folder, ``{run}``: the earlier run),
# substrings stderr must all contain, files to write into {tmp} first, stdin.
Content = str | bytes | Callable[[Path, Path], bytes]


def case(case_id: str, args: list[str], expect: list[str], files: dict[str, Content] | None = None,
         stdin: str = ""):
    return pytest.param(args, expect, files or {}, stdin, id=case_id)


MY_EXPERIMENT = {"conf/experiment/mine.yaml": "# @package _global_\ndefaults:\n  - digits_mlp\n"
                 "trainer:\n  max_epocs: 3\n"}
MY_MODEL = {"conf/model/mymlp.yaml": "_target_: trainkit.models.MLP\nhiden_sizes: [32]\ndropout: 0.0\n"}
MY_OPTIMIZER_IN_EXPERIMENT = {"conf/experiment/mine.yaml": "# @package _global_\ndefaults:\n  - digits_mlp\n"
                              "optimizer:\n  lrr: 0.01\n"}
BROKEN_YAML = {"conf/experiment/broken.yaml": "# @package _global_\ndefaults:\n  - digits_mlp\n"
               "trainer:\n  max_epochs: [3\n  monitor: val/loss\n"}

CASES = [
    # unknown keys: command line, experiment YAML, group YAML, constructor arguments
    case("unknown-top-level-key", [*DIGITS, "foo=1"], ["foo"]),
    case("typo-trainer-key", [*DIGITS, "trainer.max_epocs=3"], ["trainer.max_epocs", "trainer.max_epochs"]),
    case("plus-unknown-trainer-key", [*DIGITS, "+trainer.patience=3"],
         ["trainer.patience", "trainer.early_stopping_patience"]),
    case("plus-existing-key", [*DIGITS, "+trainer.max_epochs=3"], ["trainer.max_epochs"]),
    case("typo-in-experiment-yaml", ["train", "--config-dir", "{tmp}/conf", "+experiment=mine",
                                     "trainer.max_steps=2", "scheduler=none"],
         ["trainer.max_epocs", "trainer.max_epochs", "experiment/mine"], MY_EXPERIMENT),
    case("typo-in-group-yaml", ["train", "--config-dir", "{tmp}/conf", "+experiment=digits_mlp",
                                "trainer.max_steps=2", "scheduler=none", "model=mymlp"],
         ["model.hiden_sizes", "model.hidden_sizes"], MY_MODEL),
    case("typo-group-key-in-experiment-yaml", ["train", "--config-dir", "{tmp}/conf", "+experiment=mine",
                                               "trainer.max_steps=2", "scheduler=none"],
         ["optimizer.lrr", "optimizer.lr"], MY_OPTIMIZER_IN_EXPERIMENT),
    case("plus-unknown-model-arg", [*DIGITS, "+model.hiden=3"], ["model.hiden", "model.hidden_sizes"]),
    case("typo-data-key", [*DIGITS, "data.batchsize=32"], ["data.batchsize", "data.batch_size"]),
    case("yaml-syntax-error", ["train", "--config-dir", "{tmp}/conf", "+experiment=broken"],
         ["broken.yaml"], BROKEN_YAML),
    case("missing-config-dir", ["train", "--config-dir", "{tmp}/no_such_conf", "+experiment=digits_mlp"],
         ["no_such_conf"]),
    # wrong types
    case("max-epochs-not-int", [*DIGITS, "trainer.max_epochs=abc"], ["trainer.max_epochs", "abc"]),
    case("seed-float", [*DIGITS, "seed=1.5"], ["seed", "1.5"]),
    case("grad-accum-list", [*DIGITS, "trainer.grad_accum_steps=[1]"], ["trainer.grad_accum_steps"]),
    case("compile-not-bool", [*DIGITS, "trainer.compile=maybe"], ["trainer.compile", "maybe"]),
    case("lr-not-number", [*DIGITS, "optimizer.lr=fast"], ["optimizer.lr", "fast"]),
    # out-of-range values
    case("batch-size-zero", [*DIGITS, "data.batch_size=0"], ["data.batch_size"]),
    case("negative-lr", [*DIGITS, "optimizer.lr=-1"], ["optimizer.lr", "-1"]),
    case("max-epochs-zero", [*DIGITS, "trainer.max_epochs=0"], ["trainer.max_epochs"]),
    case("grad-accum-zero", [*DIGITS, "trainer.grad_accum_steps=0"], ["trainer.grad_accum_steps"]),
    case("warmup-negative", ["train", "+experiment=digits_mlp", "trainer.max_steps=2", "scheduler.warmup_steps=-1"],
         ["scheduler.warmup_steps=-1"]),
    case("monitor-mode-up", [*DIGITS, "trainer.monitor_mode=up"], ["trainer.monitor_mode", "up"]),
    case("negative-clip", [*DIGITS, "trainer.clip_grad_norm=-1"], ["trainer.clip_grad_norm"]),
    case("unknown-activation", [*DIGITS, "model.activation=swish"], ["activation", "swish"]),
    case("unknown-monitor-metric", [*DIGITS, "trainer.monitor=val/acc"], ["val/acc"]),
    # values torch would take silently (or explain without the key)
    case("plus-unknown-top-level-key", [*DIGITS, "+foo=bar"], ["'foo'", "top-level keys", "seed"]),
    case("plus-misspelled-top-level-key", [*DIGITS, "+seeed=1"], ["'seeed'", "did you mean seed"]),
    case("label-smoothing-above-one", [*DIGITS, "loss.label_smoothing=1.5"], ["loss.label_smoothing=1.5"]),
    case("composite-term-label-smoothing", [*DIGITS, "loss=composite", "loss.terms.ce.loss.label_smoothing=2"],
         ["loss.terms.ce.loss.label_smoothing=2"]),
    case("hidden-size-zero", [*DIGITS, "model.hidden_sizes=[0]"], ["model.hidden_sizes=[0]"]),
    case("dropout-above-one", [*DIGITS, "model.dropout=1.5"], ["model.dropout=1.5"]),
    case("lora-dropout-one", [*DIGITS, "+finetune=lora", "finetune.dropout=1.0"], ["finetune.dropout=1.0"]),
    case("vae-latent-zero", [*VAE, "model.latent_dim=0"], ["model.latent_dim=0"]),
    case("transformer-heads-not-dividing", [*NMT_TINY, "model.num_heads=3"], ["model.d_model=32", "model.num_heads=3"]),
    # components that do not fit each other: found by the dry forward at build time
    case("mse-on-classification", [*DIGITS, "loss=mse"],
         ["loss=mse does not fit task=classification", "[4, 10]", "[4]", "loss=cross_entropy"]),
    case("out-features-not-the-classes", [*DIGITS, "+model.out_features=3"],
         ["model=mlp does not fit data=digits", "[4, 3]", "10 classes", "model.out_features=3"]),
    case("cross-entropy-on-regression", [*DIABETES, "loss=cross_entropy"],
         ["loss=cross_entropy does not fit task=regression", "[4, 1]", "loss=mse"]),
    case("regression-on-class-ids", [*DIGITS, "task=regression", "loss=mse"],
         ["loss=mse does not fit task=regression", "task=classification"]),
    case("vae-in-features-not-the-data", [*VAE, "+model.in_features=10"],
         ["model=vae does not fit data=digits", "[4, 64]", "model.in_features=10"]),
    case("mse-on-translation", [*NMT_TINY, "loss=mse", "~loss.label_smoothing"],
         ["loss=mse does not fit task=seq2seq", "loss=cross_entropy"]),
    case("model-loss-task-without-a-loss", [*DIGITS, "task=model_loss", "~loss"], ["task=model_loss", "reads the loss"]),
    # unknown group options: the message lists the valid ones
    case("unknown-optimizer", [*DIGITS, "optimizer=adamx"], ["adamx", "adam", "adamw", "sgd"]),
    case("unknown-experiment", ["train", "+experiment=nope"], ["nope", "digits_mlp", "nmt_tiny"]),
    case("unknown-model", [*DIGITS, "model=resnet"], ["resnet", "mlp", "transformer"]),
    # missing, empty and malformed data files
    case("tsv-missing", [*NMT_TSV, "data.train_path=missing.tsv", "data.valid_path=v.tsv"], ["missing.tsv"]),
    case("tsv-valid-path-unset", [*NMT_TSV, "data.train_path={tmp}/train.tsv"], ["data.valid_path"],
         {"train.tsv": GOOD_TSV}),
    case("tsv-empty", [*NMT_TSV, "data.train_path={tmp}/train.tsv", "data.valid_path={tmp}/valid.tsv"],
         ["train.tsv", "empty"], {"train.tsv": "", "valid.tsv": GOOD_TSV}),
    case("tsv-line-without-tab", [*NMT_TSV, "data.train_path={tmp}/bad.tsv", "data.valid_path={tmp}/valid.tsv"],
         ["bad.tsv:3"], {"bad.tsv": "one\teins\ntwo\tzwei\nthree drei\nfour\tvier\n", "valid.tsv": GOOD_TSV}),
    case("tsv-not-utf8", [*NMT_TSV, "data.train_path={tmp}/latin1.tsv", "data.valid_path={tmp}/valid.tsv"],
         ["latin1.tsv", "UTF-8"], {"latin1.tsv": "one\teins\nfive\tf\u00fcnf\n".encode("latin-1"),
                                   "valid.tsv": GOOD_TSV}),
    case("npz-not-an-array-file", [*DIGITS, "+data.path={tmp}/table.npz"], ["table.npz"],
         {"table.npz": "a,b\n1,2\n"}),
    # unreadable checkpoints
    case("eval-garbage-ckpt", ["eval", "ckpt={tmp}/garbage.pt"], ["garbage.pt", "corrupt"],
         {"garbage.pt": b"not a checkpoint\n"}),
    case("resume-garbage-ckpt", [*DIGITS, "resume={tmp}/garbage.pt"], ["garbage.pt", "corrupt"],
         {"garbage.pt": b"not a checkpoint\n"}),
    case("eval-truncated-ckpt", ["eval", "ckpt={tmp}/truncated.pt"], ["truncated.pt"],
         {"truncated.pt": truncated_checkpoint}),
    case("eval-ckpt-needs-unpickling", ["eval", "ckpt={tmp}/evil.pt"], ["evil.pt", "unpickling"],
         {"evil.pt": evil_checkpoint}),
    case("eval-not-a-trainkit-ckpt", ["eval", "ckpt={tmp}/plain.pt"], ["plain.pt"],
         {"plain.pt": plain_checkpoint}),
    case("init-from-garbage", [*DIGITS, "init_from={tmp}/garbage.pt"], ["garbage.pt", "corrupt"],
         {"garbage.pt": b"\x00\x01\x02"}),
    case("resume-other-model", ["train", "+experiment=diabetes_mlp", "trainer.max_steps=20",
                                "resume={run}/checkpoints/last.pt"], ["last.pt", "weight"]),
    # incompatible combinations
    case("fp16-on-missing-cuda", [*DIGITS, "precision=fp16", "device=cuda"], ["cuda"]),
    case("resume-auto-never-ran", [*DIGITS, "name=never_ran", "resume=auto"], ["resume=auto", "never_ran"]),
    case("eval-without-ckpt", ["eval", "split=test"], ["ckpt"]),
    case("eval-unknown-split", ["eval", "ckpt={run}/checkpoints/best.pt", "split=bogus"], ["split", "bogus"]),
    case("eval-batch-size-not-int", ["eval", "ckpt={run}/checkpoints/best.pt", "batch_size=abc"],
         ["batch_size", "abc"]),
    case("translate-digits-ckpt", ["translate", "ckpt={run}/checkpoints/best.pt"], ["best.pt"],
         stdin="one hundred\n"),
    case("translate-beam-zero", ["translate", "ckpt=x", "beam=0"], ["beam"]),
    case("export-unknown-format", ["export", "ckpt={run}/checkpoints/best.pt", "format=pdf"], ["pdf"]),
    # unwritable output directory (tests run as root: chmod would not stop a write)
    case("run-dir-under-proc", [*DIGITS, "hydra.run.dir=/proc/trainkit_cannot_write"],
         ["/proc/trainkit_cannot_write"]),
    case("run-dir-parent-is-file", [*DIGITS, "hydra.run.dir={tmp}/a_file/run"], ["a_file"],
         {"a_file": "a regular file\n"}),
    # misc
    case("target-not-importable", [*DIGITS, "optimizer._target_=torch.optim.Nope"], ["torch.optim.Nope"]),
    case("misspelled-command", ["trian", "+experiment=digits_mlp"], ["trian", "train"]),
]


@pytest.mark.parametrize(("args", "expect", "files", "stdin"), CASES)
def test_bad_input(args, expect, files, stdin, earlier, cli, tmp_path, request):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content = content(earlier.run, tmp_path)
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(earlier.run)) for a in args]
    out = cli(*argv, cwd=earlier.root, stdin=stdin)
    shown = f"\n$ trainkit {' '.join(argv)}\nexit {out.returncode}\nstderr:\n{out.stderr[-3000:]}"
    print(shown)  # pytest -rA shows what each case printed
    try:
        assert out.returncode == 2, shown
        assert "Traceback" not in out.stderr, shown
        assert out.stderr.count("trainkit: error:") == 1, f"not exactly one error message{shown}"
        message = out.stderr[out.stderr.index("trainkit: error:"):]  # not Hydra's echo of the overrides
        missing = [s for s in expect if s not in message]
        assert not missing, f"stderr does not name {missing}{shown}"
        assert not (tmp_path / "pwned").exists(), "unpickling the checkpoint ran code"
    finally:
        check_nothing_changed(earlier, request.node.callspec.id)


def test_full_error_shows_traceback(earlier, cli):
    out = cli(*DIGITS, "trainer.max_epocs=3", cwd=earlier.root, env={"HYDRA_FULL_ERROR": "1"}, stdin="")
    assert out.returncode == 2, out.stderr
    assert "Traceback" in out.stderr
    assert "trainer.max_epochs" in out.stderr[out.stderr.index("trainkit: error:"):]
    check_nothing_changed(earlier, "full-error")


def test_disk_full_while_saving_keeps_previous_checkpoint(compose, tmp_path, monkeypatch):
    import trainkit.core.checkpoint
    from trainkit import train_model
    from trainkit.core.errors import TrainkitError

    cfg = compose(["+experiment=digits_mlp", "trainer.max_epochs=2", "scheduler=none",
                   "logging.tensorboard=false", "logging.progress_bar=false"])
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    real_save = trainkit.core.checkpoint.torch.save
    calls: list[object] = []
    first: dict[str, bytes] = {}

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            first["last.pt"] = last.read_bytes()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(trainkit.core.checkpoint.torch, "save", save)
    with pytest.raises(TrainkitError) as raised:
        train_model(cfg, run_dir=run_dir)
    monkeypatch.undo()
    assert len(calls) == 2
    error = raised.value
    assert error.exit_code == 2, f"exit_code {error.exit_code}: {error}"
    assert str(last) in str(error) and "No space left" in str(error), str(error)
    assert last.read_bytes() == first["last.pt"], "the previous last.pt changed"
    state = torch.load(last, weights_only=True)
    assert state["model"] and state["trainer_state"]["global_step"] > 0
    assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left"


# the dry forward changes nothing -----------------------------------------------------------------
class NoisyMLP(torch.nn.Module):
    """A user's model whose forward draws from every RNG (as augmentations in a model might)."""

    calls = 0

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(in_features, 16), torch.nn.Dropout(0.5),
                                        torch.nn.Linear(16, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        NoisyMLP.calls += 1
        shift = random.random() + float(np.random.rand()) + float(torch.rand(()))
        return self.body(x + 0.0 * shift)


def rng_states() -> list:
    return [random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()]


def test_dry_forward_leaves_rngs_and_training_flags_as_they_were(compose):
    from trainkit.run.build import build
    from trainkit.run.checks import check_fit

    cfg = compose(["+experiment=digits_mlp", f"model._target_={__name__}.NoisyMLP", "~model.hidden_sizes",
                   "~model.dropout", "~model.activation", "~model.gradient_checkpointing"])
    parts = build(cfg, 0)
    parts.model.train()
    parts.model.body[1].eval()  # a submodule the user froze: it must stay in eval mode
    flags = [m.training for m in parts.model.modules()]
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before, calls = rng_states(), NoisyMLP.calls
    check_fit(cfg, parts.data, parts.model, parts.task)
    assert NoisyMLP.calls == calls + 1, "the dry forward did not run the model once"
    assert rng_states() == before, "the dry forward moved an RNG"
    assert [m.training for m in parts.model.modules()] == flags
    assert not parts.model._forward_hooks and not parts.model._forward_pre_hooks


def test_runs_with_and_without_the_dry_forward_are_identical(compose, tmp_path, monkeypatch):
    """digits_contrastive draws its augmentations from torch's RNG inside the loss."""
    from conftest import assert_same_weights, load_weights

    import trainkit.run.checks
    from trainkit import train_model

    overrides = ["+experiment=digits_contrastive", "trainer.max_steps=3", "trainer.test_after_fit=false",
                 "logging.tensorboard=false", "logging.progress_bar=false"]
    calls = []
    real = trainkit.run.checks.check_fit
    monkeypatch.setattr(trainkit.run.checks, "check_fit", lambda *args: calls.append(real(*args)))
    train_model(compose(overrides), run_dir=tmp_path / "checked")
    monkeypatch.setattr(trainkit.run.checks, "check_fit", lambda *args: None)
    train_model(compose(overrides), run_dir=tmp_path / "unchecked")
    assert len(calls) == 1
    assert_same_weights(load_weights(tmp_path / "checked/checkpoints/last.pt"),
                        load_weights(tmp_path / "unchecked/checkpoints/last.pt"))


# a warm-up longer than the run --------------------------------------------------------------------
def test_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    from trainkit.schedulers import Noam, WarmupCosine

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    with caplog.at_level(logging.WARNING, logger="trainkit"):
        cosine = WarmupCosine(optimizer(), total_steps=50, warmup_steps=400)
        noam = Noam(optimizer(), d_model=64, warmup_steps=400, factor=2.0, total_steps=50)
        kept = WarmupCosine(optimizer(), total_steps=50, warmup_steps=49)
    assert cosine.warmup_steps == 5 and noam.warmup_steps == 5 and kept.warmup_steps == 49
    warned = [r.getMessage() for r in caplog.records if "scheduler.warmup_steps=400" in r.getMessage()]
    assert len(warned) == 2 and all("shortened to 5" in m for m in warned), caplog.text
    peak = max(noam.lr_at(step) for step in range(50))
    assert peak == pytest.approx(2.0 * (64 * 400) ** -0.5)  # the configured peak, reached at step 5
    assert WarmupCosine(optimizer(), total_steps=50, warmup_steps=50).warmup_steps == 5  # as long: never decays


def test_a_preset_runs_for_one_epoch_with_its_longer_warmup(cli, tmp_path):
    """digits_contrastive has 5 optimizer steps an epoch and warms up over 20."""
    out = cli("train", "+experiment=digits_contrastive", "trainer.max_epochs=1", "trainer.test_after_fit=false",
              "logging.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "scheduler.warmup_steps=20 is not shorter than the run (5 optimizer steps): shortened to 1" in log
