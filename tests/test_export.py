"""`trainkit export`: each format loads outside trainkit and gives the checkpoint's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import train_runs

from trainkit.commands.export import export_checkpoint
from trainkit.core.checkpoint import load_weights, read_checkpoint
from trainkit.core.errors import ConfigError
from trainkit.run.build import build

DIGITS = ["+experiment=digits_mlp", "trainer.max_steps=20", "scheduler.warmup_steps=5",
          "logging.progress_bar=false"]
NMT = ["+experiment=nmt_tiny", "trainer.max_steps=5", "scheduler.warmup_steps=2", "task.metrics=[perplexity]",
       "task.num_samples=0", "trainer.monitor=val/loss", "trainer.monitor_mode=min", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One quick digits_mlp and one nmt_tiny checkpoint, trained in-process."""
    return train_runs(tmp_path_factory.mktemp("export"), {"digits": DIGITS, "nmt": NMT})


def reference(ckpt: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict]:
    """The checkpoint's model (eval mode), the inputs of one validation batch, the checkpoint."""
    state, cfg = read_checkpoint(ckpt)
    parts = build(cfg, cfg.seed, data_state=state.get("data"))
    load_weights(parts.model, state["model"], ckpt)
    batch = next(iter(parts.data.loader("val")))
    inputs = (batch["src"], batch["tgt_in"]) if isinstance(batch, dict) else (batch[0],)
    return parts.model.eval(), inputs, state


def fresh_model(ckpt: Path) -> torch.nn.Module:
    """The same architecture with freshly initialised weights (a different seed)."""
    state, cfg = read_checkpoint(ckpt)
    return build(cfg, cfg.seed + 1, data_state=state.get("data")).model.eval()


@pytest.mark.parametrize("kind", ["digits", "nmt"])
def test_safetensors_and_sidecars(checkpoints, tmp_path, kind):
    from safetensors.torch import load_file

    model, inputs, state = reference(checkpoints[kind])
    written = export_checkpoint(checkpoints[kind], "safetensors", tmp_path / "model.safetensors")
    assert written[:2] == [tmp_path / "model.safetensors", tmp_path / "model.yaml"]
    loaded = fresh_model(checkpoints[kind])
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"))  # strict: every key is there
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), atol=1e-5, rtol=0)
    config = yaml.safe_load((tmp_path / "model.yaml").read_text())
    assert config["model"]["_target_"] == state_config(state)["model"]["_target_"]
    if kind == "nmt":
        import sentencepiece

        assert written[2] == tmp_path / "model.tokenizer.model"
        assert written[2].read_bytes() == state["data"]["tokenizer"]["model"]
        processor = sentencepiece.SentencePieceProcessor(model_file=str(written[2]))
        assert processor.vocab_size() == model.src_vocab_size
        from safetensors import safe_open

        with safe_open(tmp_path / "model.safetensors", "pt") as file:  # the tied embeddings
            assert json.loads(file.metadata()["tied"]) == {"src_embed.weight": "tgt_embed.weight",
                                                            "output_proj.weight": "tgt_embed.weight"}


def state_config(state: dict) -> dict:
    return yaml.safe_load(state["config"])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["digits", "nmt"])
def test_torchscript(checkpoints, tmp_path, kind):
    model, inputs, _ = reference(checkpoints[kind])
    [path, *_] = export_checkpoint(checkpoints[kind], "torchscript", tmp_path / "model.torchscript.pt")
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(scripted(*inputs), model(*inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["digits", "nmt"])
def test_onnx_runs_in_onnxruntime(checkpoints, tmp_path, kind):
    import onnxruntime  # in .[dev] (as onnxscript, which the export needs): missing fails, never skips
    model, inputs, _ = reference(checkpoints[kind])
    [path, *_] = export_checkpoint(checkpoints[kind], "onnx", tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    [logits] = session.run(None, {name: tensor.numpy() for name, tensor in zip(names, inputs)})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(*inputs), atol=1e-5, rtol=0)


def test_onnx_without_the_extra_names_the_install(checkpoints, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "trainkit\[onnx\]"'):
        export_checkpoint(checkpoints["digits"], "onnx", tmp_path / "model.onnx")


def test_export_command(checkpoints, cli, tmp_path):
    done = cli("export", f"ckpt={checkpoints['digits']}", "format=safetensors", f"out={tmp_path / 'm.safetensors'}")
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'm.safetensors'}" in done.stdout and (tmp_path / "m.yaml").is_file()
    bad = cli("export", f"ckpt={checkpoints['digits']}", "format=tflite")
    assert bad.returncode == 2 and "format='tflite'" in bad.stderr and "Traceback" not in bad.stderr
    same = cli("export", f"ckpt={checkpoints['digits']}", "format=merged", f"out={checkpoints['digits']}")
    assert same.returncode == 2 and "is the checkpoint itself" in same.stderr
