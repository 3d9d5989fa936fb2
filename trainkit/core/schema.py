"""The typed schema of the top-level config, and the checks run before anything is built.

The schema backs the root of the composed config (Hydra's ConfigStore, struct mode), so a
misspelled top-level or ``trainer.*`` key fails at composition, in a YAML file or on the
command line alike. Groups that name a ``_target_`` (model, data, loss, optimizer,
scheduler, task, callbacks) stay free-form here; their keys are checked against the
target's signature by ``trainkit.run.build``. Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.core.mlflow_tracker import uri_problem


@dataclass
class GradientCacheConfig:
    chunk_size: int | None = None  # samples per encoder pass (task=contrastive): memory of a chunk, negatives of the batch; null: off


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    max_steps: int | None = None  # optimizer steps; when set it wins over max_epochs
    grad_accum_steps: int = 1  # micro-batches per optimizer step: memory for fewer updates
    clip_grad_norm: float | None = 1.0  # null disables clipping
    log_every_n_steps: int = 10
    eval_every_n_steps: int | None = None  # null: at the end of every epoch
    save_every_n_steps: int | None = None  # null: at the end of every epoch
    compile: bool = False  # torch.compile the model: slow start, faster steps on big models
    monitor: str = "val/loss"  # the metric for best.pt, early stopping and plateau
    monitor_mode: str = "min"  # min | max
    early_stopping_patience: int | None = None  # evaluations without improvement; null: off
    early_stopping_min_delta: float = 0.0  # smallest change that counts as improvement
    save_top_k: int = 1  # best checkpoints kept besides best.pt/last.pt (1: best.pt only)
    test_after_fit: bool = True  # evaluate best.pt on the test split at the end
    nan_policy: str = "error"  # error: stop before a non-finite update | skip: drop that update
    max_consecutive_skips: int = 5  # skip: stop after this many non-finite steps in a row
    profile: bool = False  # torch.profiler trace of a few steps into <run dir>/profile/
    profile_wait_steps: int = 5
    profile_warmup_steps: int = 2
    profile_active_steps: int = 5
    gradient_cache: GradientCacheConfig = field(default_factory=GradientCacheConfig)  # Gao et al. 2021; read by task=contrastive


@dataclass
class DistributedConfig:
    nproc_per_node: int = 1  # >1 self-launches that many workers (torchrun semantics)
    backend: str | None = None  # null: nccl on CUDA, gloo otherwise
    strategy: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard: parameters, gradients, optimizer state sharded)
    fsdp_wrap: list[str] = field(default_factory=list)  # module classes sharded as units; []: the model's blocks
    fsdp_reshard_after_forward: bool = True  # free gathered parameters after each block's forward


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    autocast_dtype: str | None = None  # bfloat16 | float16 | null (no autocast)
    grad_scaling: bool = False  # loss scaling against fp16 gradient underflow
    param_dtype: str | None = None  # float64 for numerical checks; null: the model's own dtype


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    csv: bool = False  # metrics.csv in the run directory: a row per logged step, a column per metric
    mlflow: bool = False  # an MLflow run: params, metrics, tags, artifacts (trainkit.core.mlflow_tracker)
    mlflow_tracking_uri: str | None = None  # null: sqlite:///outputs/mlflow.db (runs), multirun/mlflow.db (sweeps)
    mlflow_experiment: str | None = None  # null: the experiment's name
    mlflow_log_checkpoint: bool = False  # also store best.pt as an artifact of the MLflow run
    progress_bar: bool | None = None  # null: a bar in a terminal, plain lines otherwise
    histograms_every_n_steps: int | None = None  # per-layer weight/grad histograms; null: off (free)


@dataclass
class TrainkitConfig:
    name: str = "default"  # the experiment's name: outputs/<name>/..., resume=auto looks there
    seed: int = 0
    resume: str | None = None  # null | auto | a checkpoint path
    init_from: str | None = None  # a trainkit checkpoint whose weights start the model (not its optimizer or step)
    finetune: Any = None  # +finetune=lora: train low-rank adapters only (trainkit.techniques.lora)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: Any = MISSING
    model: Any = MISSING
    loss: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    task: Any = MISSING
    callbacks: Any = field(default_factory=dict)  # name -> {_target_: ..., ...}
    trust: list[str] = field(default_factory=list)  # module prefixes whose _target_s may be built from a checkpoint's stored config


SCHEMA_NAME = "trainkit_schema"


START_TIME = time.time()


def run_time(fmt: str) -> str:
    """``${trainkit_now:FORMAT}``: the run's start time, shared by every rank of a DDP job
    (``TRAINKIT_RUN_TIME``, set from rank 0), so all ranks use one run directory."""
    return time.strftime(fmt, time.localtime(float(os.environ.get("TRAINKIT_RUN_TIME", START_TIME))))


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists it first in its
    defaults) and register the ``trainkit_now`` resolver."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainkitConfig)
    OmegaConf.register_new_resolver("trainkit_now", run_time, replace=True)


def schema_keys(path: str) -> list[str] | None:
    """Valid key names at a dotted path of the schema ('' is the root), None if free-form."""
    node: Any = TrainkitConfig
    for part in [p for p in path.split(".") if p]:
        match = {f.name: f for f in fields(node)}.get(part)
        if match is None or not isinstance(match.default_factory, type):
            return None
        node = match.default_factory
    return [f.name for f in fields(node)]


def check_values(cfg: Any) -> list[ConfigError]:
    """Range and choice checks the types alone cannot express; every problem, not the first,
    in a fixed order: unknown keys, trainer values, the other sections, then probabilities."""
    from omegaconf import OmegaConf

    problems = [*unknown_keys(cfg), *trainer_problems(cfg.trainer), *section_problems(cfg)]
    for group in ("model", "loss", "finetune"):
        if OmegaConf.is_config(cfg.get(group)):
            node = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=False)
            problems += probability_problems(node, group)
    return [ConfigError(message) for message in problems]


def unknown_keys(cfg: Any) -> list[str]:
    """Top-level and schema-section keys the schema does not know (``+foo=...`` and
    ``+trainer.x=...`` get past struct mode), each with its closest valid key."""
    problems = []
    root = [*(schema_keys("") or []), "hydra"]  # hydra: Hydra's own node, when a config keeps it
    for key in cfg:
        if key not in root:
            hint = did_you_mean(str(key), root) or f" (top-level keys: {', '.join(root)})"
            problems.append(f"unknown top-level key '{key}'{hint}")
    for section in ("trainer", "distributed", "precision", "device", "logging"):
        valid = schema_keys(section) or []
        for key in cfg.get(section) or {}:
            if key not in valid:
                problems.append(f"unknown key '{section}.{key}'{did_you_mean(str(key), valid, section + '.')}")
    return problems


def trainer_problems(t: Any) -> list[str]:
    """Out-of-range ``trainer.*`` values."""
    checks = [
        (t.max_epochs >= 1, f"trainer.max_epochs={t.max_epochs}: must be at least 1"),
        (t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps}: must be at least 1 or null"),
        (t.grad_accum_steps >= 1, f"trainer.grad_accum_steps={t.grad_accum_steps}: must be at least 1"),
        (t.clip_grad_norm is None or t.clip_grad_norm > 0, f"trainer.clip_grad_norm={t.clip_grad_norm}: must be positive or null"),
        (t.log_every_n_steps >= 1, f"trainer.log_every_n_steps={t.log_every_n_steps}: must be at least 1"),
        *((t[key] is None or t[key] >= 1, f"trainer.{key}={t[key]}: must be at least 1 or null")
          for key in ("eval_every_n_steps", "save_every_n_steps", "early_stopping_patience")),
        (t.monitor_mode in ("min", "max"), f"trainer.monitor_mode={t.monitor_mode!r}: must be 'min' or 'max'"),
        (t.nan_policy in ("error", "skip"), f"trainer.nan_policy={t.nan_policy!r}: must be 'error' or 'skip'"),
        (t.max_consecutive_skips >= 1, f"trainer.max_consecutive_skips={t.max_consecutive_skips}: must be at least 1"),
        (t.save_top_k >= 1, f"trainer.save_top_k={t.save_top_k}: must be at least 1"),
    ]
    return [message for ok, message in checks if not ok]


def section_problems(cfg: Any) -> list[str]:
    """Out-of-range values of distributed, device, precision, ``optimizer.lr`` and the data
    sizes (free-form groups: a key they do not have is not checked here)."""
    dtype = cfg.precision.autocast_dtype
    param_dtype = cfg.precision.get("param_dtype")
    lr = cfg.optimizer.get("lr") if cfg.optimizer is not None else None
    data = cfg.data
    checks = [
        (cfg.distributed.nproc_per_node >= 1, f"distributed.nproc_per_node={cfg.distributed.nproc_per_node}: must be at least 1"),
        (cfg.distributed.strategy in ("ddp", "fsdp"), f"distributed.strategy={cfg.distributed.strategy!r}: must be ddp or fsdp"),
        (cfg.device.type in ("auto", "cpu", "cuda", "mps"), f"device.type={cfg.device.type!r}: must be one of auto, cpu, cuda, mps"),
        (dtype in (None, "bfloat16", "float16"), f"precision.autocast_dtype={dtype!r}: must be bfloat16, float16 or null"),
        (param_dtype in (None, "float32", "float64"),
         f"precision.param_dtype={param_dtype!r}: must be float64, float32 or null"),
        (not (param_dtype and dtype), f"precision.param_dtype={param_dtype} with precision.autocast_dtype={dtype}: "
         "autocast would compute in the lower precision; use precision=fp64 alone"),
        (lr is None or (isinstance(lr, (int, float)) and lr >= 0), f"optimizer.lr={lr}: must be a non-negative number"),
        *((value is None or (isinstance(value, int) and value >= 1), f"data.{key}={value}: must be a positive integer")
          for key in ("batch_size", "max_tokens") for value in [data.get(key) if data is not None else None]),
        (data is None or data.get("num_workers", 0) >= 0, f"data.num_workers={data.get('num_workers')}: must be >= 0"),
        *((False, problem) for problem in [uri_problem(cfg.logging.get("mlflow_tracking_uri"))] if problem),
    ]
    return [message for ok, message in checks if not ok]


def probability_problems(node: Any, path: str) -> list[str]:
    """Dropout rates (``dropout``, ``*_dropout``) outside [0, 1) and ``label_smoothing``
    outside [0, 1], at any depth of a plain container (a composite loss's terms too)."""
    problems = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"
        if isinstance(value, (dict, list)):
            problems += probability_problems(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if (str(key) == "dropout" or str(key).endswith("_dropout")) and not 0 <= value < 1:
                problems.append(f"{name}={value}: a dropout rate must be in [0, 1) (1 drops everything)")
            elif key == "label_smoothing" and not 0 <= value <= 1:
                problems.append(f"{name}={value}: must be in [0, 1] (0: none, 1: uniform targets)")
    return problems
