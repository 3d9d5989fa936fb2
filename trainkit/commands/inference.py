"""Using a finished checkpoint: ``trainkit eval`` and ``trainkit translate``, and the one way
any command reads a checkpoint's stored config (:func:`read_checkpoint`).

Checkpoints are read with ``weights_only=True``, and the config stored inside one is data:
before anything is imported or built from it, every ``_target_`` in it must be trusted
(``build.check_trusted``: trainkit's component classes, ``torch.nn``, ``torch.optim``, or
a prefix the user lists with ``trust=[...]`` on the command line; the stored config's own
``trust`` key never counts). The files it names are data too: relative paths resolve
against the folder the training run started in, each file a command reads because the
stored config names it is logged, and nothing is written where the stored config says
(its tokenizer ``cache_dir`` is dropped). ``translate`` and ``export`` rebuild the model
from the stored ``runtime`` values without reading data.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from trainkit.commands.arguments import TRUST_HELP, log_to_stderr, parse_pairs
from trainkit.core.builder import parse_trust
from trainkit.core.checkpoint import load_weights, read_checkpoint
from trainkit.core.devices import resolve_device
from trainkit.core.errors import ConfigError
from trainkit.engine.loop import Trainer
from trainkit.run.build import build
from trainkit.techniques.rebuild import apply_overrides, localize, model_runtime, rebuild_model

log = logging.getLogger("trainkit")


def run_eval(args: list[str]) -> int:
    """``trainkit eval ckpt=PATH [split=] [device=] [batch_size=] [trust=] [data.KEY=VALUE]``."""
    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "checkpoint path", "split": "val|test", "device": "cpu|cuda|auto",
                                 "batch_size": "override", "trust": TRUST_HELP}, "eval", ("data.",))
    if "ckpt" not in options:
        raise ConfigError("eval: ckpt=PATH is required (for example ckpt=outputs/<name>/<time>/checkpoints/best.pt)")
    try:
        batch_size = int(options["batch_size"]) if "batch_size" in options else None
    except ValueError:
        raise ConfigError(f"eval: batch_size={options['batch_size']!r} must be a whole number") from None
    data = {key: value for key, value in options.items() if key.startswith("data.")}
    evaluate_checkpoint(options["ckpt"], options.get("split", "test"), options.get("device", "cpu"), batch_size,
                        parse_trust(options.get("trust")), data)
    return 0


def run_translate(args: list[str]) -> int:
    """``trainkit translate ckpt=PATH [input=FILE] [beam=4] [batch_size=64] [max_len=]
    [length_penalty=1.0] [device=cpu] [trust=]``: stdin (or FILE) to stdout, line by line."""
    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "", "input": "", "beam": "", "batch_size": "", "max_len": "",
                                 "device": "", "length_penalty": "", "trust": TRUST_HELP}, "translate")
    if "ckpt" not in options:
        raise ConfigError("translate: ckpt=PATH is required")
    try:
        beam = int(options.get("beam", 4))
        batch_size = int(options.get("batch_size", 64))
        max_len = int(options["max_len"]) if "max_len" in options else None
        length_penalty = float(options.get("length_penalty", 1.0))
    except ValueError as error:
        raise ConfigError(f"translate: {error}") from None
    if beam < 1 or batch_size < 1:
        raise ConfigError("translate: beam and batch_size must be at least 1")
    translate_stream(options["ckpt"], options.get("input"), beam, batch_size, max_len,
                     length_penalty, options.get("device", "cpu"), trust=parse_trust(options.get("trust")))
    return 0


def evaluate_checkpoint(path: str | Path, split: str = "test", device: str = "cpu",
                        batch_size: int | None = None, trust: Sequence[str] = (),
                        data: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Metrics of a checkpoint on one split; printed as JSON and written beside the run.
    ``data`` holds ``data.KEY`` overrides of the stored data config (the user's own files)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"eval: split={split!r}; choose val or test (or train)")
    state, cfg = read_checkpoint(path, trust)
    overrides = dict(data or {})
    apply_overrides(cfg, overrides)
    if batch_size is not None:
        cfg.data.batch_size = batch_size
    if cfg.get("finetune") is None and "init_from" in cfg:
        cfg.init_from = None  # the checkpoint holds every weight; only LoRA needs its base
    localize(cfg, state, path, "eval", ("data", "loss"), overrides)
    parts = build(cfg, cfg.seed, data_state=state.get("data"), stored=model_runtime(state, cfg, path))
    loader = parts.data.loader(split)
    if loader is None:
        raise ConfigError(f"eval: the data of this checkpoint has no {split!r} split")
    trainer = Trainer(parts.model, parts.optimizer, task=parts.task, device=device)
    load_weights(trainer.model, state["model"], path)
    metrics = trainer.evaluate(loader, split)
    print(json.dumps(metrics, indent=2))
    out = Path(path).resolve().parent.parent / f"eval-{split}.json"
    try:
        out.write_text(json.dumps({"checkpoint": str(path), **metrics}, indent=2) + "\n")
    except OSError:
        pass  # a read-only run directory still gets its metrics printed
    return metrics


def load_translator(path: str | Path, device: torch.device,
                    trust: Sequence[str] = ()) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer inside a translation checkpoint; no data is read."""
    from trainkit.data.tokenizers import tokenizer_from_state
    from trainkit.data.translation import runtime_for

    state, cfg = read_checkpoint(path, trust)
    tokenizer_state = (state.get("data") or {}).get("tokenizer")
    if tokenizer_state is None:
        raise ConfigError(f"translate: checkpoint {path} holds no tokenizer (not a translation model)")
    try:
        tokenizer = tokenizer_from_state(tokenizer_state)
    except ValueError as error:
        raise ConfigError(f"translate: checkpoint {path}: its tokenizer cannot be read: {error}") from None
    model = rebuild_model(path, state, cfg, "translate", runtime_for(tokenizer))
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def translate_lines(model: torch.nn.Module, tokenizer: Any, lines: list[str], beam: int = 4,
                    batch_size: int = 64, max_len: int | None = None, length_penalty: float = 1.0,
                    device: torch.device | None = None) -> list[str]:
    """Translations in input order; empty lines stay empty. Sorted by length to batch tightly."""
    from trainkit.data.translation import pad
    from trainkit.models.decoding import decode_batch

    limit = model.max_len - 1
    encoded = {i: tokenizer.encode(line)[: limit - 1] + [tokenizer.eos_id] for i, line in enumerate(lines) if line.strip()}
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    out = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        src = pad([encoded[i] for i in rows], tokenizer.pad_id).to(device or "cpu")
        length = min(limit, max_len or 2 * src.shape[1] + 10)
        ids = decode_batch(model, src, tokenizer.bos_id, tokenizer.eos_id, beam, length, length_penalty)
        for row, hypothesis in zip(rows, ids):
            out[row] = tokenizer.decode(hypothesis)
    return out


def translate_stream(path: str | Path, input_path: str | None, beam: int, batch_size: int,
                     max_len: int | None, length_penalty: float, device: str = "cpu",
                     output: TextIO = sys.stdout, trust: Sequence[str] = ()) -> None:
    torch_device = resolve_device(device)
    model, tokenizer = load_translator(path, torch_device, trust)
    if input_path is None:
        lines = sys.stdin.read().splitlines()
    else:
        try:
            lines = Path(input_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"translate: cannot read input={input_path}: {error}") from None
    for line in translate_lines(model, tokenizer, lines, beam, batch_size, max_len, length_penalty, torch_device):
        output.write(line + "\n")
    output.flush()
