"""Rebuilding a trained model from its checkpoint: the files its stored config names (made
explicit and resolved against the folder the run started in), its sizes (the stored
``runtime`` values), its LoRA base and its weights. Used by eval, translate, export and a
distillation teacher; the config must have passed ``core.checkpoint.read_checkpoint``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trainkit.core.builder import instantiate
from trainkit.core.checkpoint import load_weights, stored_runtime
from trainkit.core.errors import ConfigError
from trainkit.techniques.lora import apply_finetune

log = logging.getLogger("trainkit")


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
    model = cfg.get("model")
    if cfg.get("finetune") is not None and isinstance(model, DictConfig) and model.get("pretrained"):
        yield "model.pretrained", model, "pretrained"  # the base of a Hugging Face model's adapters


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


def model_runtime(state: dict[str, Any], cfg: DictConfig, path: str | Path) -> dict[str, Any] | None:
    """The stored ``runtime`` values a rebuilt model is given. A LoRA checkpoint holds adapters
    only, so its Hugging Face model is loaded from its ``model.pretrained`` base rather than
    built from the stored architecture (``hf_config``)."""
    runtime = stored_runtime(state, path)
    if runtime is not None and cfg.get("finetune") is not None:
        runtime.pop("hf_config", None)
        classes = ((state.get("data") or {}).get("labels") or {}).get("classes")
        if isinstance(classes, list) and all(isinstance(name, str) for name in classes):
            runtime["class_names"] = classes  # the label names the stored config no longer carries
    return runtime


def rebuild_model(path: str | Path, state: dict[str, Any], cfg: DictConfig, command: str,
                  known: dict[str, Any] | None = None, label: str = "model") -> torch.nn.Module:
    """The checkpoint's model with its weights (a LoRA checkpoint: adapters on their base),
    from a config that passed :func:`read_checkpoint`. Sized by the stored ``runtime`` values
    and ``known`` ones (a tokenizer's), without reading data; a checkpoint older than
    ``runtime`` with nothing ``known`` has its data built to size the model (logged)."""

    runtime = model_runtime(state, cfg, path)
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
