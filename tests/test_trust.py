"""A checkpoint's stored config is data: rebuilding from it never runs code the user did not trust.

Every hostile checkpoint here loads with ``torch.load(weights_only=True)``; only its stored
``config`` string is rewritten, with gadgets that would create a marker file if they ran
(each fires when its module is trusted: see ``test_a_trusted_gadget_really_runs``).
"""

from __future__ import annotations

import logging
import os
import pickle
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_runs

from trainkit import train_model
from trainkit.commands.export import export_checkpoint
from trainkit.commands.inference import evaluate_checkpoint, load_translator
from trainkit.core import checkpoint
from trainkit.core.errors import ConfigError
from trainkit.run.build import build

DIGITS = ["+experiment=digits_mlp", "trainer.max_steps=3", "scheduler.warmup_steps=1", "logging.progress_bar=false"]
NMT = ["+experiment=nmt_tiny", "trainer.max_steps=2", "scheduler.warmup_steps=1", "task.metrics=[perplexity]",
       "task.num_samples=0", "trainer.monitor=val/loss", "trainer.monitor_mode=min", "logging.progress_bar=false"]


class Touch:
    """Unpickling this creates the marker file: what a pickle gadget could do to any file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A digits_mlp and an nmt_tiny checkpoint, each a few steps, trained in-process."""
    return train_runs(tmp_path_factory.mktemp("trusted"), {"digits": DIGITS, "nmt": NMT})


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture
def pickled(tmp_path, marker) -> Path:
    """A pickle file that creates the marker when it is unpickled."""
    path = tmp_path / "gadget.pkl"
    path.write_bytes(pickle.dumps(Touch(marker)))
    return path


def rewrite(source: Path, target: Path, edit: Callable[[dict], None]) -> Path:
    """``source`` with its stored config edited, saved as plain tensors and containers with
    fresh checksums (checksums catch corruption, not someone who rewrites a file)."""
    state = checkpoint.load(source)
    config = yaml.safe_load(state["config"])
    edit(config)
    state["config"] = yaml.safe_dump(config)
    resave(state, target)
    return target


def resave(state: dict, target: Path) -> None:
    state.pop("checksums", None)
    checkpoint.save(state, target)
    torch.load(target, weights_only=True)  # still a weights-only checkpoint


def numpy_load(pickled: Path) -> dict:
    return {"_target_": "numpy.load", "file": str(pickled), "allow_pickle": True}


def gadgets(pickled: Path, marker: Path) -> dict[str, tuple[Callable[[dict], None], str, str]]:
    """name -> (edit of the stored config, the key and the target the refusal must name)."""
    unpickle = numpy_load(pickled)
    return {
        "model": (lambda c: c.__setitem__("model", unpickle), "model", "numpy.load"),
        "model_argument": (lambda c: c["model"].__setitem__("activation", unpickle), "model.activation", "numpy.load"),
        "loss_argument": (lambda c: c["loss"].__setitem__("weight", unpickle), "loss.weight", "numpy.load"),
        "callback": (lambda c: c.__setitem__("callbacks", {"evil": unpickle}), "callbacks.evil", "numpy.load"),
        "task_list_element": (lambda c: c["task"]["metrics"].__setitem__(0, unpickle), "task.metrics[0]",
                              "numpy.load"),
        "path_writer": (lambda c: c["model"].__setitem__("activation", {
            "_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "x"]}),
            "model.activation", "pathlib.Path.write_text"),
        "open_for_writing": (lambda c: c["model"].__setitem__("dropout", {
            "_target_": "builtins.open", "file": str(marker), "mode": "w"}), "model.dropout", "builtins.open"),
        "torch_load_through_torch_nn": (lambda c: c.__setitem__("model", {
            "_target_": "torch.nn.functional.torch.load", "f": str(pickled), "weights_only": False}),
            "model", "torch.nn.functional.torch.load"),
        "os_system_through_trainkit_data": (lambda c: c["model"].__setitem__("activation", {
            "_target_": "trainkit.data.translation.os.system", "_args_": [f"touch {marker}"]}),
            "model.activation", "trainkit.data.translation.os.system"),
        "checkpoint_save": (lambda c: c.__setitem__("model", {
            "_target_": "trainkit.core.checkpoint.save", "state": {}, "path": str(marker)}),
            "model", "trainkit.core.checkpoint.save"),
        "export_path_writer": (lambda c: c["model"].__setitem__("activation", {
            "_target_": "trainkit.commands.export.Path.write_text",
            "_args_": [{"_target_": "trainkit.commands.export.Path", "_args_": [str(marker)]}, "x"]}),
            "model.activation", "trainkit.commands.export.Path.write_text"),
    }


GADGETS = ["model", "model_argument", "loss_argument", "callback", "task_list_element", "path_writer",
           "open_for_writing", "torch_load_through_torch_nn", "os_system_through_trainkit_data",
           "checkpoint_save", "export_path_writer"]


def hostile(trained: Path, tmp_path: Path, pickled: Path, marker: Path, name: str) -> tuple[Path, str, str]:
    edit, key, target = gadgets(pickled, marker)[name]
    return rewrite(trained, tmp_path / f"{name}.pt", edit), key, target


def assert_refused(error: BaseException | str, ckpt: Path, key: str, target: str, marker: Path) -> None:
    message = str(error)
    assert f"checkpoint {ckpt}: its stored config names {key}._target_={target}" in message, message
    assert "add trust=[" in message and "to the command line" in message, message
    assert not marker.exists(), "the gadget ran"


# Every command that rebuilds from a checkpoint ----------------------------------------------------
@pytest.mark.parametrize("name", GADGETS)
def test_eval_refuses_every_gadget(trained, tmp_path, pickled, marker, name):
    ckpt, key, target = hostile(trained["digits"], tmp_path, pickled, marker, name)
    with pytest.raises(ConfigError) as refused:
        evaluate_checkpoint(ckpt)
    assert_refused(refused.value, ckpt, key, target, marker)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx", "merged"])
@pytest.mark.parametrize("name", ["model_argument", "torch_load_through_torch_nn", "checkpoint_save"])
def test_export_refuses_gadgets_in_every_format(trained, tmp_path, pickled, marker, name, fmt):
    ckpt, key, target = hostile(trained["digits"], tmp_path, pickled, marker, name)
    with pytest.raises(ConfigError) as refused:
        export_checkpoint(ckpt, fmt, tmp_path / "out" / "model")
    assert_refused(refused.value, ckpt, key, target, marker)
    assert not (tmp_path / "out").exists()


def translation_gadgets(pickled: Path, marker: Path) -> dict[str, tuple[Callable[[dict], None], str, str]]:
    unpickle = numpy_load(pickled)
    return {
        "model": (lambda c: c.__setitem__("model", unpickle), "model", "numpy.load"),
        "model_argument": (lambda c: c["model"].__setitem__("d_model", unpickle), "model.d_model", "numpy.load"),
        "data_argument": (lambda c: c["data"].__setitem__("max_len", unpickle), "data.max_len", "numpy.load"),
        "torch_save_through_trainkit_models": (lambda c: c["model"].__setitem__("dropout", {
            "_target_": "trainkit.models.transformer.torch.save", "obj": 1, "f": str(marker)}),
            "model.dropout", "trainkit.models.transformer.torch.save"),
    }


@pytest.mark.parametrize("name", ["model", "model_argument", "data_argument", "torch_save_through_trainkit_models"])
def test_translate_refuses_gadgets(trained, tmp_path, pickled, marker, name):
    edit, key, target = translation_gadgets(pickled, marker)[name]
    ckpt = rewrite(trained["nmt"], tmp_path / "nmt.pt", edit)
    with pytest.raises(ConfigError) as refused:
        load_translator(ckpt, torch.device("cpu"))
    assert_refused(refused.value, ckpt, key, target, marker)


@pytest.mark.parametrize("name", ["model", "loss_argument", "callback", "os_system_through_trainkit_data"])
def test_distillation_teacher_is_checked_in_train(compose, trained, tmp_path, pickled, marker, name):
    ckpt, key, target = hostile(trained["digits"], tmp_path, pickled, marker, name)
    with pytest.raises(ConfigError) as refused:
        build(compose(["+experiment=digits_distill", f"loss.teacher_ckpt={ckpt}", "logging.progress_bar=false"]), 0)
    assert_refused(refused.value, ckpt, key, target, marker)


@pytest.mark.parametrize("name", ["model", "task_list_element", "path_writer"])
def test_init_from_is_checked_in_train(compose, trained, tmp_path, pickled, marker, name):
    ckpt, key, target = hostile(trained["digits"], tmp_path, pickled, marker, name)
    with pytest.raises(ConfigError) as refused:
        build(compose([*DIGITS, f"init_from={ckpt}"]), 0)
    assert str(refused.value).startswith(f"init_from={ckpt}: ")
    assert_refused(refused.value, ckpt, key, target, marker)


def test_eval_refuses_a_hostile_teacher_or_lora_base_named_by_a_clean_checkpoint(trained, tmp_path, pickled,
                                                                                 marker):
    """The chain: a checkpoint whose own config is clean names (relatively, from the folder it
    was trained in) a teacher or a LoRA base whose config is not."""
    evil = hostile(trained["digits"], tmp_path, pickled, marker, "model")[0]
    for name, edit in {
        "student": lambda c: c.__setitem__("loss", {"_target_": "trainkit.distill.DistillationLoss",
                                                     "teacher_ckpt": evil.name}),
        "lora": lambda c: c.update(init_from=evil.name, finetune={"method": "lora", "rank": 2}),
    }.items():
        ckpt = rewrite(trained["digits"], tmp_path / f"{name}.pt", edit)
        state = checkpoint.load(ckpt)
        state["origin"] = {"cwd": str(tmp_path), "run_dir": str(tmp_path)}  # as if trained in tmp_path
        resave(state, ckpt)
        with pytest.raises(ConfigError) as refused:
            evaluate_checkpoint(ckpt)
        assert_refused(refused.value, evil, "model", "numpy.load", marker)


def test_interpolations_in_a_stored_config_are_refused(trained, tmp_path, marker):
    ckpt = rewrite(trained["digits"], tmp_path / "interpolated.pt",
                   lambda c: c["model"].__setitem__("activation", "${oc.env:HOME}"))
    with pytest.raises(ConfigError, match=r"interpolation at model.activation"):
        evaluate_checkpoint(ckpt)


def test_prefixes_match_on_module_boundaries(trained, tmp_path, marker):
    ckpt = rewrite(trained["digits"], tmp_path / "lookalike.pt",
                   lambda c: c.__setitem__("model", {"_target_": "trainkitevil.Model"}))
    with pytest.raises(ConfigError, match="not trusted") as refused:
        evaluate_checkpoint(ckpt, trust=["trainkit"])
    assert "trainkitevil.Model, which is not trusted" in str(refused.value)


def test_a_trusted_gadget_really_runs(trained, tmp_path, pickled, marker):
    """The gadgets above are real: trusting numpy lets the stored numpy.load unpickle the file."""
    ckpt, _, _ = hostile(trained["digits"], tmp_path, pickled, marker, "model_argument")
    with pytest.raises(ConfigError):  # numpy.load returned the file handle: not an activation name
        evaluate_checkpoint(ckpt, trust=["numpy"])
    assert marker.exists()


# The command line ---------------------------------------------------------------------------------
def test_commands_exit_2_naming_checkpoint_key_and_target(cli, trained, tmp_path, pickled, marker):
    digits = hostile(trained["digits"], tmp_path, pickled, marker, "model_argument")
    nmt = rewrite(trained["nmt"], tmp_path / "nmt.pt",
                  lambda c: c["model"].__setitem__("d_model", numpy_load(pickled)))
    for args, (ckpt, key, target) in [
        (["eval", f"ckpt={digits[0]}"], digits),
        (["export", f"ckpt={digits[0]}", "format=torchscript", f"out={tmp_path / 'out' / 'm.pt'}"], digits),
        (["translate", f"ckpt={nmt}", "trust=[mypkg,other]"], (nmt, "model.d_model", "numpy.load")),
    ]:
        done = cli(*args, stdin="one\n")
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert_refused(done.stderr, ckpt, key, target, marker)
    assert "trusted here: mypkg, other" in done.stderr and "add trust=[numpy]" in done.stderr
    assert not (tmp_path / "out").exists()


USER_MODULE = '''
from torch import nn


class TinyNet(nn.Sequential):
    def __init__(self, in_features: int, out_features: int, hidden: int = 8):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))
'''


def test_trust_on_the_command_line_allows_a_users_module(cli, compose, tmp_path, monkeypatch):
    """A model from the user's own package: refused without trust=[...] (also when the
    checkpoint's stored config trusts it itself), evaluated and exported with it."""
    package = tmp_path / "tk_user_models"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose([*DIGITS, "trust=[tk_user_models]"])  # the run's own trust list is stored with it
    cfg.model = {"_target_": "tk_user_models.TinyNet", "hidden": 8}
    train_model(cfg, run_dir=tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    refused = cli("eval", f"ckpt={ckpt}", env=env)
    assert refused.returncode == 2
    assert "model._target_=tk_user_models.TinyNet, which is not trusted" in refused.stderr
    assert "add trust=[tk_user_models] to the command line" in refused.stderr
    allowed = cli("eval", f"ckpt={ckpt}", "trust=[tk_user_models]", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert '"test/accuracy"' in allowed.stdout
    exported = cli("export", f"ckpt={ckpt}", "format=safetensors", "trust=tk_user_models",
                   f"out={tmp_path / 'm.safetensors'}", env=env)
    assert exported.returncode == 0, exported.stderr


# Data paths named by a stored config ---------------------------------------------------------------
def test_relative_data_paths_resolve_where_the_run_started(compose, tmp_path, monkeypatch, caplog):
    from trainkit.data.arrays import FILES

    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir()
    elsewhere.mkdir()
    (started / "mine.npz").write_bytes((FILES / "digits.npz").read_bytes())
    (elsewhere / "mine.npz").write_bytes(b"not an npz")  # what the current folder would give
    monkeypatch.chdir(started)
    train_model(compose([*DIGITS, "+data.path=mine.npz"]), run_dir=started / "run")
    ckpt = started / "run" / "checkpoints" / "last.pt"
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.INFO, logger="trainkit"):
        metrics = evaluate_checkpoint(ckpt, split="val")
    assert "val/accuracy" in metrics
    assert f"eval reads data named by the checkpoint's config: data.path={started / 'mine.npz'}" in caplog.text
    (started / "mine.npz").unlink()
    with pytest.raises(ConfigError, match=r"data.path=mine.npz \(relative to .*started, where the training run "
                                          r"started\), which does not exist here; pass the data explicitly: eval "
                                          r".* data.path=FILE"):
        evaluate_checkpoint(ckpt, split="val")
    (elsewhere / "own.npz").write_bytes((FILES / "digits.npz").read_bytes())
    assert "val/accuracy" in evaluate_checkpoint(ckpt, split="val", data={"data.path": "own.npz"})


def test_export_reads_no_data_when_the_checkpoint_holds_its_runtime_values(trained, tmp_path, caplog):
    missing = tmp_path / "gone.npz"
    ckpt = rewrite(trained["digits"], tmp_path / "moved.pt", lambda c: c["data"].__setitem__("path", str(missing)))
    with caplog.at_level(logging.INFO, logger="trainkit"):
        written = export_checkpoint(ckpt, "safetensors", tmp_path / "m.safetensors")
    assert written[0].is_file() and "reads data" not in caplog.text
    state = checkpoint.load(ckpt)
    del state["runtime"]  # as written by an older trainkit
    resave(state, ckpt)
    with caplog.at_level(logging.INFO, logger="trainkit"), pytest.raises(ConfigError, match="gone.npz"):
        export_checkpoint(ckpt, "safetensors", tmp_path / "m2.safetensors")  # now it builds the data
    assert "holds no runtime values" in caplog.text
    assert not (tmp_path / "m2.safetensors").exists()


def test_eval_writes_no_tokenizer_cache_where_a_stored_config_says(trained, tmp_path):
    """With the tokenizer state gone and a stored cache_dir, eval trains a tokenizer again but
    caches it where the user keeps theirs, never in the folder the checkpoint names."""
    evil_cache = tmp_path / "evil-cache"
    ckpt = rewrite(trained["nmt"], tmp_path / "nmt.pt",
                   lambda c: c["data"].__setitem__("cache_dir", str(evil_cache)))
    state = checkpoint.load(ckpt)
    del state["data"]
    resave(state, ckpt)
    assert "val/loss" in evaluate_checkpoint(ckpt, split="val")
    assert not evil_cache.exists()


# An unwritable export target ---------------------------------------------------------------------
def test_export_to_an_unwritable_place_is_exit_2_and_leaves_nothing(cli, trained, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "sub" / "model.safetensors"
    done = cli("export", f"ckpt={trained['digits']}", "format=safetensors", f"out={target}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("trainkit: error:")]
    assert lines == [f"trainkit: error: export: cannot write out={target}: Not a directory"], done.stderr


def test_an_export_failing_midway_leaves_no_partial_files(trained, tmp_path, monkeypatch):
    import trainkit.commands.export

    def failing_sidecars(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainkit.commands.export, "write_sidecars", failing_sidecars)
    out = tmp_path / "new" / "deeper"
    with pytest.raises(ConfigError, match=f"export: cannot write out={out / 'm.safetensors'}: No space left"):
        export_checkpoint(trained["digits"], "safetensors", out / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
