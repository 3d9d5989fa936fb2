"""``trainkit export``: a trained model outside trainkit, as safetensors, TorchScript or ONNX,
as a plain checkpoint with LoRA adapters merged in (``format=merged``), as one consolidated
checkpoint file (``format=pt``, from a sharded ``fsdp`` checkpoint folder), or, for ``model=hf``,
as a folder ``transformers`` loads with ``from_pretrained`` (``format=hf``).

The model is rebuilt from the config stored in the checkpoint (read with
``weights_only=True``, every ``_target_`` in it trusted first, see
``trainkit.core.checkpoint.read_checkpoint``) and the runtime values stored beside it, without
reading data; a LoRA checkpoint is rebuilt on its ``init_from`` base and its adapters
merged, so every format holds one plain model. Beside the exported file go the
resolved config (``<base>.yaml``) and, for translation models, the tokenizer
(``<base>.tokenizer.model``, a sentencepiece model file, or ``<base>.tokenizer.json`` for
the word/char vocabularies); ``<base>`` is the output path without its format's extension.

Example inputs for tracing come from the model itself: random token ids below the
vocabulary size for an encoder-decoder (``src_vocab_size``/``tgt_vocab_size``), random
features of the first ``nn.Linear``'s width otherwise.

Every file is written into a hidden folder beside the target and moved into place at the
end: an export that fails (an unwritable ``out``, a model that cannot be traced) leaves
nothing behind.

Never: load a checkpoint with ``weights_only=False``, build a ``_target_`` the user has not
trusted, write where a stored config says, or write over the checkpoint it reads.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from trainkit.__about__ import __version__
from trainkit.commands.arguments import TRUST_HELP, log_to_stderr, parse_pairs
from trainkit.core import checkpoint
from trainkit.core.builder import parse_trust
from trainkit.core.errors import ConfigError, TrainkitError

log = logging.getLogger("trainkit")
EXTENSIONS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx",
              "merged": ".merged.pt", "hf": ".hf", "pt": ".consolidated.pt"}
ONNX_HINT = 'pip install "trainkit[onnx]"'


def run_export(args: list[str]) -> int:
    """``trainkit export ckpt=PATH format=FORMAT [out=PATH] [trust=]``: prints each file written."""
    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "checkpoint path", "format": "|".join(EXTENSIONS),
                                 "out": "output path", "trust": TRUST_HELP}, "export")
    if "ckpt" not in options or "format" not in options:
        raise ConfigError(f"export: ckpt=PATH and format={'|'.join(EXTENSIONS)} are required")
    for path in export_checkpoint(options["ckpt"], options["format"], options.get("out"),
                                  parse_trust(options.get("trust"))):
        print(f"wrote {path}")
    return 0


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path | None = None,
                      trust: Sequence[str] = ()) -> list[Path]:
    """Export the model of ``ckpt`` as ``fmt``; returns the files written (the export first).
    The checkpoint's stored config must be trusted under ``trust``; no data is read when the
    checkpoint holds its runtime values. All files appear together or none do."""
    if fmt not in EXTENSIONS:
        raise ConfigError(f"export: format={fmt!r}; choose one of {', '.join(EXTENSIONS)}")
    if fmt == "onnx":
        require_onnx()
    target = output_path(ckpt, fmt, out)
    model, cfg, state = plain_model(ckpt, trust)
    with staged(target) as folder:
        draft = folder / target.name
        if fmt == "merged":
            written = [write_merged(model, cfg, state, ckpt, draft)]
        elif fmt == "hf":
            written = [write_hf(model, cfg, state, draft)]
        elif fmt == "pt":
            written = [write_consolidated(model, cfg, state, ckpt, draft)]
        else:
            {"safetensors": write_safetensors, "torchscript": write_torchscript, "onnx": write_onnx}[fmt](model, draft)
            written = [draft, *write_sidecars(cfg, state, sidecar_base(draft, fmt))]
    return [target.parent / path.name for path in written]


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A hidden folder beside ``target`` to write every output into; when the block ends
    without error each file is moved into place, otherwise nothing is: the folder and any
    parent folders made for it are removed. A place that cannot be written is a
    ``ConfigError`` naming ``out``."""
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        remove_folders(made)
        raise ConfigError(f"export: cannot write out={target}: {error.strerror or error}") from None
    moved: list[Path] = []
    done = False
    try:
        yield folder
        for draft in sorted(folder.iterdir()):
            os.replace(draft, target.parent / draft.name)
            moved.append(target.parent / draft.name)
        done = True
    except OSError as error:
        raise ConfigError(f"export: cannot write out={target}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if not done:
            for path in moved:
                path.unlink(missing_ok=True)
            remove_folders(made)


def remove_folders(folders: list[Path]) -> None:
    """Remove folders an export made, deepest first (each must be empty)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def plain_model(ckpt: str | Path, trust: Sequence[str] = ()) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(the checkpoint's model in eval mode with any LoRA adapters merged, its config without
    ``finetune``/``init_from``, the checkpoint dict). Sized by the checkpoint's stored runtime
    values (or its tokenizer): data is read only for a checkpoint that holds neither."""
    from trainkit.core.checkpoint import read_checkpoint
    from trainkit.techniques.lora import merge_lora
    from trainkit.techniques.rebuild import rebuild_model

    state, cfg = read_checkpoint(ckpt, trust)
    lora = cfg.get("finetune") is not None
    known = None
    tokenizer = (state.get("data") or {}).get("tokenizer")
    if tokenizer is not None:
        from trainkit.data.tokenizers import tokenizer_from_state
        from trainkit.data.translation import runtime_for

        try:
            known = runtime_for(tokenizer_from_state(tokenizer))
        except ValueError as error:
            raise ConfigError(f"export: checkpoint {ckpt}: its tokenizer cannot be read: {error}") from None
    model = rebuild_model(ckpt, state, cfg, "export", known)
    if lora:
        merge_lora(model)
    cfg.finetune, cfg.init_from = None, None
    return model.eval(), cfg, state


def output_path(ckpt: str | Path, fmt: str, out: str | Path | None) -> Path:
    """``out``, or the checkpoint's path with the format's extension (best.pt -> best.onnx)."""
    source = Path(ckpt)
    target = Path(out) if out else source.with_name(source.stem + EXTENSIONS[fmt])
    if target.resolve() == source.resolve():
        raise ConfigError(f"export: out={target} is the checkpoint itself; choose another path")
    if fmt == "hf":
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ConfigError(f"export: out={target} exists; format=hf writes a new folder, give a path that "
                              "does not exist (or an empty folder)")
        return target
    if target.is_dir():
        raise ConfigError(f"export: out={target} is a folder; give a file path such as "
                          f"out={target / (source.stem + EXTENSIONS[fmt])}")
    return target


def sidecar_base(target: Path, fmt: str) -> Path:
    """The output path without its format's extension: model.safetensors -> model."""
    extension = EXTENSIONS[fmt]
    if target.name.endswith(extension) and len(target.name) > len(extension):
        return target.with_name(target.name[: -len(extension)])
    return target.with_suffix("")


def write_sidecars(cfg: Any, state: dict[str, Any], base: Path) -> list[Path]:
    """The resolved config and (translation models) the tokenizer, beside the export."""
    written = [base.with_name(base.name + ".yaml")]
    written[0].write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tokenizer = (state.get("data") or {}).get("tokenizer")
    if tokenizer is not None and tokenizer.get("kind") != "hf":  # a Hugging Face one goes with format=hf
        if isinstance(tokenizer.get("model"), bytes):  # bpe/unigram: a sentencepiece model file
            path = base.with_name(base.name + ".tokenizer.model")
            path.write_bytes(tokenizer["model"])
        else:  # word/char: the vocabulary, id = position
            path = base.with_name(base.name + ".tokenizer.json")
            path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        written.append(path)
    return written


# Formats ----------------------------------------------------------------------------------------
def write_safetensors(model: nn.Module, target: Path) -> None:
    """Every state_dict key, each tensor its own copy: safetensors refuses shared storage, and a
    copy per name keeps ``model.load_state_dict(load_file(path))`` strict and simple. Tied
    weights are listed in the metadata (``tied``: name -> the name it shares storage with)."""
    from safetensors.torch import save_file

    weights = model.state_dict()
    first_name: dict[tuple[int, int], str] = {}
    tied = {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in first_name:
            tied[name] = first_name[key]
        else:
            first_name[key] = name
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in weights.items()}
    metadata = {"format": "pt", "trainkit_version": __version__, "tied": json.dumps(tied)}
    save_file(tensors, str(target), metadata=metadata)


def write_torchscript(model: nn.Module, target: Path) -> None:
    """``torch.jit.trace`` on example inputs, checked on inputs of other shapes."""
    example = example_inputs(model)
    with torch.no_grad(), warnings.catch_warnings():
        # jit is deprecated in favour of torch.export, and the tracer warns about Python
        # branches on sizes (the max_len check): check_same runs the trace on other shapes.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, tuple(example.values()))
        check_same(model, traced, "torchscript")
        torch.jit.save(traced, str(target))


def write_onnx(model: nn.Module, target: Path) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch and, for
    token inputs, dynamic lengths."""
    example = example_inputs(model)
    batch = torch.export.Dim("batch", min=1)
    max_len = getattr(model, "max_len", 4096)
    dynamic = {name: {0: batch, 1: torch.export.Dim(f"{name}_len", min=1, max=max_len)}
               if tensor.dtype == torch.long else {0: batch} for name, tensor in example.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # skip its notes about torchvision ops not installed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(example.values()), str(target), input_names=list(example),
                              output_names=["logits"], dynamic_shapes=dynamic, dynamo=True, verbose=False,
                              external_data=weight_bytes > 2**30)  # one file below the 2 GB protobuf limit
    except Exception as error:
        raise TrainkitError(f"export format=onnx: torch.onnx.export failed for {type(model).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    finally:
        quiet.setLevel(level)


def write_merged(model: nn.Module, cfg: Any, state: dict[str, Any], ckpt: str | Path, target: Path) -> Path:
    """A plain checkpoint: the merged weights, the config without ``finetune``/``init_from`` and
    the tokenizer. Enough for eval, translate, export and ``init_from``; not for ``resume``
    (the optimizer state belonged to the adapters)."""
    merged = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
              "config": OmegaConf.to_yaml(cfg, resolve=True), "trainkit_version": __version__,
              "trainer_state": state.get("trainer_state", {}), "merged_from": str(ckpt)}
    if state.get("data"):
        merged["data"] = state["data"]
    return checkpoint.save(merged, target)


def write_consolidated(model: nn.Module, cfg: Any, state: dict[str, Any], ckpt: str | Path, target: Path) -> Path:
    """``format=pt``: one checkpoint file with the full weights (a sharded folder's gathered) and
    everything else the checkpoint holds but the optimizer state (which stays sharded): enough
    for eval, translate, export and ``init_from``; resume from the folder itself."""
    plain = {key: value for key, value in state.items() if key not in ("optimizer", "sharded", "checksums")}
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if weights.keys() == state["model"].keys():  # nothing merged: the stored tensors, in their own dtype
        weights = dict(state["model"])
    plain.update(model=weights,
                 config=OmegaConf.to_yaml(cfg, resolve=True), consolidated_from=str(ckpt))
    return checkpoint.save(plain, target)


def write_hf(model: nn.Module, cfg: Any, state: dict[str, Any], target: Path) -> Path:
    """A folder ``transformers`` loads with ``from_pretrained``: the model (``config.json``,
    ``model.safetensors``), its tokenizer when it is a Hugging Face one, and trainkit's config
    (``trainkit.yaml``) with a trainkit tokenizer's file beside it otherwise."""
    from trainkit.data.tokenizers import tokenizer_from_state

    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"export format=hf: the checkpoint's model is a {type(model).__name__}, not a Hugging "
                          "Face model (model=hf); use format=safetensors, torchscript or onnx")
    target.mkdir()
    model.save_pretrained(target)
    tokenizer = (state.get("data") or {}).get("tokenizer")
    if tokenizer is not None and tokenizer.get("kind") == "hf":
        try:
            tokenizer_from_state(tokenizer).save_pretrained(target)
        except ValueError as error:
            raise ConfigError(f"export: the checkpoint's tokenizer cannot be read: {error}") from None
    write_sidecars(cfg, state, target / "trainkit")
    return target


# Inputs and checks ------------------------------------------------------------------------------
def example_inputs(model: nn.Module, batch: int = 2, src_len: int = 7, tgt_len: int = 5) -> dict[str, torch.Tensor]:
    """Inputs named after ``model.forward``'s parameters, built from the model's own sizes."""
    names = [name for name, p in inspect.signature(model.forward).parameters.items()
             if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]
    generator = torch.Generator().manual_seed(0)
    if hasattr(model, "src_vocab_size") and hasattr(model, "tgt_vocab_size") and len(names) == 2:
        pad = getattr(model, "pad_id", 0)
        src = torch.randint(1, model.src_vocab_size, (batch, src_len), generator=generator)
        tgt = torch.randint(1, model.tgt_vocab_size, (batch, tgt_len), generator=generator)
        src[-1, -2:] = pad  # a padded row, so masking is part of the traced graph
        return {names[0]: src, names[1]: tgt}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None or len(names) != 1:
        raise ConfigError(f"export: cannot make example inputs for {type(model).__name__}: supported are "
                          "models taking one feature tensor whose first layer is an nn.Linear (MLP) and "
                          "encoder-decoders with src_vocab_size/tgt_vocab_size taking (src, tgt_in) (Transformer)")
    return {names[0]: torch.randn(batch, first.in_features, generator=generator)}


@torch.no_grad()
def check_same(model: nn.Module, exported: Any, fmt: str) -> None:
    """The exported module must give the model's outputs on inputs of shapes it was not traced on."""
    for inputs in (example_inputs(model), example_inputs(model, batch=3, src_len=9, tgt_len=3)):
        expected, got = model(*inputs.values()), exported(*inputs.values())
        if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-5, rtol=1e-4):
            raise TrainkitError(f"export format={fmt}: the traced {type(model).__name__} does not reproduce "
                                "the model on inputs of another shape; this model cannot be traced")


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"export format=onnx needs the optional package(s) {', '.join(missing)}: {ONNX_HINT}")
