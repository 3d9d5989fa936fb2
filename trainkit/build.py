"""The only place that turns config into objects.

Every group that names a ``_target_`` is checked against the target's signature before it
is built: an unknown key is reported with the closest valid name, a missing required
argument by name. Runtime values (the data's vocabulary size, the model's ``d_model``, the
run's total steps, the pad id) are offered to every target and passed only where its
signature accepts them and the config does not set them.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainkit.errors import ConfigError, ConfigErrors, did_you_mean
from trainkit.lora import apply_finetune
from trainkit.schema import check_values

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def resolve_target(node: Any, path: str) -> Any:
    """Import the object a ``_target_`` names, or explain why it cannot be."""
    from hydra.utils import get_object

    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{path}: needs a _target_ naming a class or function (got {node!r})")
    target = node._target_
    try:
        return get_object(target)
    except Exception as error:  # import errors of user modules come in many types
        cause = error.__cause__ or error
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {cause}") from None


def accepted(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of a callable and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}, True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    return named, takes_any


def check_node(node: Any, path: str, runtime: dict[str, Any] | None = None) -> list[ConfigError]:
    """Every problem of one ``_target_`` node: import, unknown keys, and (when the runtime
    values are known) missing arguments."""
    try:
        target = resolve_target(node, path)
    except ConfigError as error:
        return [error]
    params, takes_any = accepted(target)
    problems = []
    if not takes_any:
        for key in node:
            if key not in HYDRA_KEYS and key not in params:
                hint = did_you_mean(str(key), params, f"{path}.") or (
                    f" (left over from another {path} option? remove it with ~{path}.{key})")
                problems.append(ConfigError(f"{path}.{key}: not an argument of {node._target_}{hint}"))
    for name, param in params.items() if runtime is not None else ():
        if param.default is inspect.Parameter.empty and name not in node and name not in runtime:
            problems.append(ConfigError(f"{path}: {node._target_} needs the argument {name!r} ({path}.{name}=...)"))
    return problems


def instantiate(node: Any, path: str, runtime: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """Build a ``_target_`` node; ``fixed`` arguments always apply, ``runtime`` ones fill gaps."""
    from hydra.utils import instantiate as hydra_instantiate

    problems = check_node(node, path, {**(runtime or {}), **fixed})
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    params, takes_any = accepted(resolve_target(node, path))
    offered = {k: v for k, v in (runtime or {}).items() if k not in node and (takes_any or k in params)}
    try:
        # _partial_: runtime objects (parameters, modules) go straight to the call and are
        # never copied into the config.
        factory = hydra_instantiate(node, _partial_=True, _convert_="all")
        return factory(**offered, **fixed)
    except ConfigError:
        raise
    except Exception as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"{path}: {node._target_} rejected its arguments: {cause}") from None


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
          data_state: dict[str, Any] | None = None) -> Components:
    """Data, model, loss, task, optimizer, scheduler and callbacks from a composed config.
    ``data_state`` (from a checkpoint) gives the data its trained tokenizer back."""
    from trainkit.checkpoint import require_safe_torch

    require_safe_torch()
    problems = check_values(cfg)
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    data = instantiate(cfg.data, "data", {"seed": seed, "rank": rank, "world_size": world_size,
                                          "data_state": data_state})
    offered = dict(data.runtime_kwargs())
    model = instantiate(cfg.model, "model", offered)
    model = apply_finetune(cfg, model, data)  # init_from weights, +finetune=lora adapters
    loss = None
    if cfg.get("loss") is not None:
        loss = instantiate(cfg.loss, "loss", offered, **reduction_sum(cfg.loss))
    task = instantiate(cfg.task, "task", {**offered, "loss_fn": loss, "model": model})
    train_loader = data.loader("train")
    steps_per_epoch, total_steps = optimizer_steps(cfg, len(train_loader))
    weight_decay = cfg.optimizer.get("weight_decay", 0.0) or 0.0
    optimizer = instantiate(cfg.optimizer, "optimizer", params=param_groups(model, weight_decay))
    scheduler_runtime = {"total_steps": total_steps, "d_model": getattr(model, "d_model", None),
                         "mode": cfg.trainer.monitor_mode}
    scheduler = None
    if cfg.get("scheduler") is not None:
        scheduler = instantiate(cfg.scheduler, "scheduler", scheduler_runtime, optimizer=optimizer)
    # A callback may ask for its key (name) and the run's length (a curriculum schedule does).
    callbacks = [instantiate(node, f"callbacks.{name}", {"name": name, "steps_per_epoch": steps_per_epoch,
                                                          "total_steps": total_steps})
                 for name, node in (cfg.get("callbacks") or {}).items()]
    return Components(data, model, task, optimizer, scheduler, steps_per_epoch, total_steps, callbacks)


def reduction_sum(loss_cfg: DictConfig) -> dict[str, str]:
    params, takes_any = accepted(resolve_target(loss_cfg, "loss"))
    return {"reduction": "sum"} if "reduction" in params else {}


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
