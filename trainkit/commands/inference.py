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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from omegaconf import DictConfig, OmegaConf

from trainkit import checkpoint
from trainkit.build import build, check_trusted, instantiate
from trainkit.errors import ConfigError
from trainkit.precision import resolve_device
from trainkit.train import Trainer, load_weights

log = logging.getLogger("trainkit")


def read_checkpoint(path: str | Path, trust: Sequence[str] = ()) -> tuple[dict[str, Any], DictConfig]:
    """(the checkpoint dict, its stored config) once every ``_target_`` in that config is trusted;
    the config's ``trust`` key is replaced by ``trust``, the user's own list."""
    state = checkpoint.load(path)
    for key in ("model", "config"):
        if key not in state:
            raise ConfigError(f"checkpoint {path}: not a trainkit checkpoint (no {key!r})")
    try:
        cfg = OmegaConf.create(state["config"])  # YAML is parsed with a safe loader: no tags, no objects
    except Exception as error:
        raise ConfigError(f"checkpoint {path}: its stored config is not valid YAML ({error})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"checkpoint {path}: its stored config is not a mapping of keys")
    check_trusted(cfg, str(path), trust)
    cfg.trust = list(trust)
    return state, cfg


def stored_runtime(state: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The data's plain values the model was built with (sizes, pad id), None in checkpoints
    written before trainkit kept them."""
    runtime = state.get("runtime")
    if runtime is None:
        return None
    plain = isinstance(runtime, dict) and all(
        isinstance(key, str) and (value is None or isinstance(value, (bool, int, float, str)))
        for key, value in runtime.items())
    if not plain:
        raise ConfigError(f"checkpoint {path}: its 'runtime' entry is not a mapping of plain values")
    return dict(runtime)


# Files named by a stored config -----------------------------------------------------------------
def is_path_key(name: str) -> bool:
    return name == "path" or name.endswith(("_path", "_file"))


def keys_where(node: Any, key: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, Any, str]]:
    """(dotted key, parent node, name) of every leaf key of a config, at any depth, whose name
    is ``wanted``."""
    if isinstance(node, DictConfig):
        for name in list(node.keys()):
            child, dotted = node.get(name), f"{key}.{name}"
            if isinstance(child, DictConfig):
                yield from keys_where(child, dotted, wanted)
            elif wanted(str(name)):
                yield dotted, node, str(name)


def stored_files(cfg: DictConfig, sections: Iterable[str]) -> Iterator[tuple[str, Any, str]]:
    """The keys whose values name files a rebuild reads: the data's paths (``data``), a
    distillation teacher (``loss``), and the base of a LoRA checkpoint (always)."""
    sections = set(sections)
    if "data" in sections and isinstance(cfg.get("data"), DictConfig):
        yield from keys_where(cfg.data, "data", lambda name: is_path_key(name) or name == "cache_dir")
    if "loss" in sections and isinstance(cfg.get("loss"), DictConfig):
        yield from keys_where(cfg.loss, "loss", lambda name: name == "teacher_ckpt")
    if cfg.get("finetune") is not None and cfg.get("init_from"):
        yield "init_from", cfg, "init_from"


def localize(cfg: DictConfig, state: dict[str, Any], path: str | Path, command: str,
             sections: Iterable[str] = (), user_keys: Iterable[str] = ()) -> None:
    """Make the files a stored config names explicit before ``command`` reads any: relative
    paths resolve against ``origin.cwd`` (the folder the training run started in); one log
    line names every file read because the stored config says so; a stored data file that
    is missing is an error that says how to pass the data; a stored tokenizer ``cache_dir``
    is dropped (a cache is written where the user keeps theirs, not where a checkpoint says).
    Keys in ``user_keys`` were set on the command line and are left alone."""
    origin = (state.get("origin") or {}).get("cwd")
    origin = Path(origin) if isinstance(origin, str) and Path(origin).is_absolute() else None
    user_keys, named = set(user_keys), []
    data = cfg.get("data") if "data" in set(sections) else None
    name = data.get("name") if isinstance(data, DictConfig) else None
    if "data.name" not in user_keys and isinstance(name, str) and ("/" in name or "\\" in name or ".." in name):
        raise ConfigError(f"checkpoint {path}: its stored config names data.name={name}, a path rather than a "
                          f"shipped data set; pass the data explicitly (for example {command} ckpt={path} "
                          "data.name=digits or data.train_path=FILE)")
    for key, node, name in stored_files(cfg, sections):
        value = node.get(name)
        if key in user_keys or value is None:
            continue
        if name == "cache_dir":
            node[name] = None
            continue
        file = Path(str(value))
        relative = not file.is_absolute()
        if relative and origin is not None:
            file = origin / file
        node[name] = str(file)
        named.append(f"{key}={file}")
        if key.startswith("data.") and not file.exists():
            where = f" (relative to {origin}, where the training run started)" if relative and origin else ""
            raise ConfigError(f"checkpoint {path}: its stored config names {key}={value}{where}, which does not "
                              f"exist here; pass the data explicitly: {command} ckpt={path} {key}=FILE")
    if named:
        log.info("%s reads data named by the checkpoint's config: %s", command, ", ".join(named))


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any]) -> None:
    """``data.KEY=VALUE`` from the command line, values parsed as YAML (``32`` is a number)."""
    if overrides:
        dotlist = [f"{key}={value}" for key, value in overrides.items()]
        cfg.merge_with(OmegaConf.from_dotlist(dotlist))


# Rebuilding -------------------------------------------------------------------------------------
def rebuild_model(path: str | Path, state: dict[str, Any], cfg: DictConfig, command: str,
                  known: dict[str, Any] | None = None, label: str = "model") -> torch.nn.Module:
    """The checkpoint's model with its weights (a LoRA checkpoint: adapters on their base),
    from a config that passed :func:`read_checkpoint`. Sized by the stored ``runtime`` values
    and ``known`` ones (a tokenizer's), without reading data; a checkpoint older than
    ``runtime`` with nothing ``known`` has its data built to size the model (logged)."""
    from trainkit.lora import apply_finetune

    runtime = stored_runtime(state, path)
    fallback = runtime is None and known is None
    if cfg.get("finetune") is None:
        cfg.init_from = None  # the checkpoint holds every weight; only LoRA adapters need their base
    if fallback:
        log.info("checkpoint %s holds no runtime values (written by an older trainkit): %s builds its data "
                 "to size the model", path, command)
    localize(cfg, state, path, command, ("data",) if fallback else ())
    if fallback:
        data = instantiate(cfg.data, "data", {"seed": cfg.get("seed", 0), "rank": 0, "world_size": 1,
                                              "data_state": state.get("data")})
        runtime = data.runtime_kwargs()
    model = instantiate(cfg.model, label, {**(known or {}), **(runtime or {})})
    model = apply_finetune(cfg, model)  # the frozen base from init_from, then the adapters
    load_weights(model, state["model"], path)
    return model


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
    parts = build(cfg, cfg.seed, data_state=state.get("data"))
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
    tokenizer = tokenizer_from_state(tokenizer_state)
    model = rebuild_model(path, state, cfg, "translate", runtime_for(tokenizer))
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def translate_lines(model: torch.nn.Module, tokenizer: Any, lines: list[str], beam: int = 4,
                    batch_size: int = 64, max_len: int | None = None, length_penalty: float = 1.0,
                    device: torch.device | None = None) -> list[str]:
    """Translations in input order; empty lines stay empty. Sorted by length to batch tightly."""
    from trainkit.data.translation import pad
    from trainkit.decoding import beam_search, greedy_decode

    limit = model.max_len - 1
    encoded = {i: tokenizer.encode(line)[: limit - 1] + [tokenizer.eos_id] for i, line in enumerate(lines) if line.strip()}
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    out = [""] * len(lines)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        src = pad([encoded[i] for i in rows], tokenizer.pad_id).to(device or "cpu")
        length = min(limit, max_len or 2 * src.shape[1] + 10)
        if beam > 1:
            ids = beam_search(model, src, tokenizer.bos_id, tokenizer.eos_id, beam, length, length_penalty)
        else:
            ids = greedy_decode(model, src, tokenizer.bos_id, tokenizer.eos_id, length)
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
