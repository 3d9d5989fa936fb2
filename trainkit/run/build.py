"""One config becomes the parts of a run: data, model (with its fine-tuning), loss, task,
optimizer, scheduler and callbacks, each built by ``instantiate`` against its signature,
then checked together with one dry forward (``trainkit.run.checks``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainkit.core.builder import (
    accepted,
    check_node,
    instantiate,
    parse_trust,
    resolve_target,
    trusting,
)
from trainkit.core.errors import ConfigError, ConfigErrors
from trainkit.core.schema import check_values
from trainkit.losses import reduction_sum
from trainkit.techniques.lora import apply_finetune


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases and normalisation weights (ndim <= 1) are exempt."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@dataclass
class Components:
    """Everything a run is made of, built from one config."""

    data: Any
    model: Any
    task: Any
    optimizer: Any
    scheduler: Any
    steps_per_epoch: int
    total_steps: int
    callbacks: list[Any] = field(default_factory=list)


def optimizer_steps(cfg: DictConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the whole run)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.trainer.grad_accum_steps))
    total = cfg.trainer.max_steps or cfg.trainer.max_epochs * per_epoch
    return per_epoch, total


def build(cfg: DictConfig, seed: int, rank: int = 0, world_size: int = 1,
          data_state: dict[str, Any] | None = None, stored: dict[str, Any] | None = None,
          place: Callable[[Any], Any] | None = None, device_type: str = "cpu") -> Components:
    """Data, model, loss, task, optimizer, scheduler and callbacks from a composed config.
    ``data_state`` (from a checkpoint) gives the data its trained tokenizer back and ``stored``
    (its ``runtime`` values) the model what it was built with. ``place`` takes the finished
    model before its optimizer is made (FSDP shards it: ``core.sharding``); ``device_type``
    where the run trains (on CUDA: ``cuda_defaults``). A config
    read from a checkpoint must have passed ``check_trusted`` (``inference.read_checkpoint``
    does that and puts the user's own ``trust`` list in it)."""
    from trainkit.core.checkpoint import require_safe_torch

    require_safe_torch()
    problems = check_values(cfg)
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    # A distillation teacher built here checks its checkpoint against the run's own trust list.
    pinning, fusing = cuda_defaults(cfg) if device_type == "cuda" else ({}, {})
    with trusting(parse_trust(cfg.get("trust"))):
        data = instantiate(cfg.data, "data", {"seed": seed, "rank": rank, "world_size": world_size,
                                              "data_state": data_state}, **pinning)
        offered = dict(data.runtime_kwargs())
        model = instantiate(cfg.model, "model", {**offered, **(stored or {})})
        model = apply_finetune(cfg, model, data)  # init_from weights, +finetune=lora adapters
        if place is not None:
            model = place(model)
        loss = None
        if cfg.get("loss") is not None:
            loss = instantiate(cfg.loss, "loss", offered, **reduction_sum(cfg.loss))
        task = instantiate(cfg.task, "task", {**offered, "loss_fn": loss, "model": model})
        train_loader = data.loader("train")
        steps_per_epoch, total_steps = optimizer_steps(cfg, len(train_loader))
        weight_decay = cfg.optimizer.get("weight_decay", 0.0) or 0.0
        optimizer = instantiate(cfg.optimizer, "optimizer", params=param_groups(model, weight_decay), **fusing)
        scheduler_runtime = {"total_steps": total_steps, "d_model": getattr(model, "d_model", None),
                             "mode": cfg.trainer.monitor_mode}
        scheduler = None
        if cfg.get("scheduler") is not None:
            scheduler = instantiate(cfg.scheduler, "scheduler", scheduler_runtime, optimizer=optimizer)
        # A callback may ask for its key (name) and the run's length (a curriculum schedule does).
        callbacks = [instantiate(node, f"callbacks.{name}", {"name": name, "steps_per_epoch": steps_per_epoch,
                                                              "total_steps": total_steps})
                     for name, node in (cfg.get("callbacks") or {}).items()]
    from trainkit.run.checks import check_fit

    check_fit(cfg, data, model, task)  # one dry forward: a misfit is a ConfigError now, not at step 1
    return Components(data, model, task, optimizer, scheduler, steps_per_epoch, total_steps, callbacks)


def cuda_defaults(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """What training on CUDA changes, unless the config says otherwise: batches in pinned host
    memory (``data.pin_memory: null``), so their copies to the GPU overlap the step, and a
    fused optimizer (``optimizer.fused`` unset, for optimizers that have one), which skips a
    non-finite update on the device without the step waiting for it (``engine.stopping``)."""
    pinning = {"pin_memory": True} if "pin_memory" in cfg.data and cfg.data.pin_memory is None else {}
    fusing = {}
    if cfg.optimizer.get("fused") is None and "fused" in accepted(resolve_target(cfg.optimizer, "optimizer"))[0]:
        fusing = {"fused": True}
    return pinning, fusing


def validate(cfg: DictConfig) -> list[ConfigError]:
    """Every problem of a config: each group is checked on its own, then all is built."""
    problems = list(check_values(cfg))
    nodes = {group: cfg.get(group) for group in ("data", "model", "loss", "optimizer", "scheduler", "task")}
    nodes.update({f"callbacks.{name}": node for name, node in (cfg.get("callbacks") or {}).items()})
    for path, node in nodes.items():
        if node is not None:
            problems.extend(check_node(node, path))
    if not problems:
        try:
            build(cfg, cfg.seed)
        except ConfigErrors as error:
            problems.extend(error.errors)
        except ConfigError as error:
            problems.append(error)
    return problems


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
