"""``train_model()``: the life of a run, top to bottom.

1. **Compose** (``trainkit.cli``): Hydra composes ``conf/`` and the overrides against the
   schema; a typo stops here with exit 2.
2. **Join** (``core.ranks.setup``): under torchrun, join the process group; else one
   process. ``distributed.nproc_per_node=N`` starts N workers (``engine.launcher``).
3. **Seed and build** (``run.build``): every ``_target_`` is checked against its
   signature, then data, model, loss, task, optimizer and scheduler are instantiated.
4. **Resume** (``resume=PATH|auto``): the checkpoint manager puts weights, optimizer,
   scheduler, scaler, RNG states and the position inside the epoch back.
5. **Fit** (``engine.loop.Trainer.fit``): optimizer steps, validation, checkpoints.
6. **Test and report**: best.pt is evaluated on the test split and ``result.json`` written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.core import checkpoint, ranks
from trainkit.core.errors import EXIT_PREEMPTED, ConfigError, Preempted, TrainkitError
from trainkit.core.logs import RunLogger
from trainkit.core.precision import Precision
from trainkit.core.ranks import Dist
from trainkit.core.seeding import rank_seed, seed_everything
from trainkit.core.stop import STOP, stop_signals
from trainkit.engine import launcher
from trainkit.engine.loop import Trainer


@dataclass
class TrainResult:
    monitor: str
    best_metric: float | None
    metrics: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]]
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    run_dir: Path | None
    global_step: int
    epoch: int
    wall_time_s: float
    throughput: dict[str, float]
    stop_reason: str | None = None

    def summary(self) -> dict[str, Any]:
        """The content of result.json."""
        return {
            "monitor": self.monitor, "best_metric": self.best_metric, "final": self.metrics,
            "test": self.test, "global_step": self.global_step, "epoch": self.epoch,
            "wall_time_s": round(self.wall_time_s, 3), "throughput": self.throughput,
            "best_checkpoint": str(self.best_checkpoint) if self.best_checkpoint else None,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "stop_reason": self.stop_reason,
        }


def train_model(cfg: Any, run_dir: str | Path | None = None) -> TrainResult:
    """Build everything from a composed config and train it; see the module docstring."""
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else current_run_dir(cfg)
    if cfg.distributed.nproc_per_node > 1 and not ranks.under_torchrun():
        return self_launch(cfg, run_dir)  # N worker processes, each running train_model
    dist = ranks.setup(cfg.device.type, cfg.distributed.backend, cfg.distributed.strategy)
    try:
        with stop_signals():  # a SIGTERM from here on stops the run at the next safe point (exit 75)
            if dist.is_main:
                check_writable(run_dir)
            resume = find_resume(cfg.resume, run_dir)
            trainer, data = build_trainer(cfg, dist, run_dir, resume[1] if resume is not None else None)
            with trainer.logger:  # the trackers learn how the run ended (MLflow's run status), then close
                if resume is not None:
                    trainer.load_checkpoint(resume[1], path=resume[0])
                trainer.fit(data.loader("train"), data.loader("val"))
                test_loader = data.loader("test") if cfg.trainer.test_after_fit else None
                trainer.stops.raise_if_agreed("before the test pass; last.pt holds the finished training "
                                              "(resume=auto tests it)")
                test = trainer.test(test_loader) if test_loader is not None else {}
                return report(cfg, trainer, test, run_dir, time.perf_counter() - started)
    finally:
        STOP.clear()
        dist.teardown()


def build_trainer(cfg: Any, dist: Dist, run_dir: Path, resume_state: dict[str, Any] | None = None) -> tuple[Trainer, Any]:
    """The run's parts (``run.build``) and its trackers in a Trainer; returns it with the data."""
    from omegaconf import OmegaConf

    from trainkit.run.build import build
    from trainkit.run.trackers import mlflow_tracker

    seed_everything(cfg.seed)  # every rank builds the same data, model and adapters
    parts = build(cfg, cfg.seed, dist.rank, dist.world_size, place=sharding_for(cfg, dist), device_type=dist.device.type)
    if dist.rank:
        seed_everything(rank_seed(cfg.seed, dist.rank))  # then dropout and augmentation differ by rank
    precision = Precision(dist.device, cfg.precision.autocast_dtype, cfg.precision.grad_scaling, cfg.precision.name,
                          cfg.precision.get("param_dtype"))
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    mlflow = mlflow_tracker(cfg, run_dir, flat_hparams(cfg), config_yaml, resume_state) if dist.is_main else None
    logger = RunLogger(run_dir, enabled=dist.is_main, tensorboard=cfg.logging.tensorboard, csv=cfg.logging.csv,
                       progress_bar=cfg.logging.progress_bar, trackers=[mlflow] if mlflow is not None else [])
    callbacks = dict(zip((cfg.get("callbacks") or {}).keys(), parts.callbacks))  # state kept by config name
    trainer = Trainer(
        parts.model, parts.optimizer, task=parts.task, scheduler=parts.scheduler, precision=precision,
        dist=dist, run_dir=run_dir, callbacks=callbacks, logger=logger,
        config_yaml=config_yaml, extra_state=run_state(parts, run_dir, logger),
        histograms_every_n_steps=cfg.logging.histograms_every_n_steps, **OmegaConf.to_container(cfg.trainer),
    )
    logger.info("run directory %s; %s parameters; %d optimizer steps", run_dir,
                f"{sum(p.numel() for p in parts.model.parameters()):,}", parts.total_steps)
    return trainer, parts.data


def sharding_for(cfg: Any, dist: Dist) -> Any:
    """``distributed.strategy=fsdp`` under a process group: the model is sharded before its
    optimizer is made (``core.sharding``); None otherwise."""
    if not dist.sharded:
        return None
    from functools import partial

    from trainkit.core.sharding import shard_model

    settings = cfg.distributed
    return partial(shard_model, device=dist.device, wrap=list(settings.fsdp_wrap or []),
                   reshard_after_forward=settings.fsdp_reshard_after_forward, compute_dtype=cfg.precision.autocast_dtype,
                   param_dtype=cfg.precision.get("param_dtype"))


def report(cfg: Any, trainer: Trainer, test: dict[str, float], run_dir: Path, wall_time_s: float) -> TrainResult:
    """The run's result; rank 0 logs the test metrics and hyperparameters and writes result.json."""
    result = make_result(trainer, test, run_dir, wall_time_s)
    if trainer.dist.is_main:
        logger = trainer.logger
        logger.log_metrics(test, trainer.state.global_step, trainer.state.epoch)
        logger.log_hparams(flat_hparams(cfg), {**result.metrics, **test})
        logger.close()
        (run_dir / "result.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
        logger.summary({f"best {result.monitor}": result.best_metric, **test, "steps": result.global_step,
                        "epochs": result.epoch, "wall time": f"{result.wall_time_s:.1f} s",
                        "result": run_dir / "result.json"})
    return result


def self_launch(cfg: Any, run_dir: Path) -> TrainResult:
    """``distributed.nproc_per_node=N``: train in N workers, return rank 0's result."""
    from omegaconf import OmegaConf

    from trainkit.run.trackers import handed_to_workers

    check_writable(run_dir)
    with handed_to_workers(cfg, run_dir):
        outcome = launcher.launch(train_model, OmegaConf.to_yaml(cfg, resolve=True), str(run_dir),
                                  cfg.distributed.nproc_per_node)
    if "error" in outcome:
        error_type = {2: ConfigError, EXIT_PREEMPTED: Preempted}.get(outcome["exit_code"], TrainkitError)
        raise error_type(outcome["message"])
    return TrainResult(**outcome)


def run_state(parts: Any, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    """What checkpoints keep besides the training state: the data's (``data_state``) and the
    trackers' (``tracking``: the MLflow run a resumed run continues)."""
    tracking = logger.tracker_state()
    return {**data_state(parts.data, run_dir, parts.model), **({"tracking": tracking} if tracking else {})}


def data_state(data: Any, run_dir: Path, model: Any = None) -> dict[str, Any]:
    """What checkpoints keep about the data: its own state (tokenizers) under ``data``; the
    plain values it told the model (``runtime``: sizes, pad id) and those the model reports
    about itself (``runtime_state()``: a Hugging Face model's config), so the model can be
    rebuilt without reading data or its original directory; and ``origin``, the folder the run
    started in (a stored relative data path means a file there) and its run directory."""
    state = data.state_dict() if hasattr(data, "state_dict") else {}
    offered = {**data.runtime_kwargs(), **(model.runtime_state() if hasattr(model, "runtime_state") else {})}
    runtime = {key: value for key, value in offered.items()
               if isinstance(value, (bool, int, float, str)) or value is None}
    origin = {"cwd": str(Path.cwd().resolve()), "run_dir": str(Path(run_dir).resolve())}
    return {**({"data": state} if state else {}), "runtime": runtime, "origin": origin}


def make_result(trainer: Trainer, test: dict[str, float], run_dir: Path, wall_time_s: float) -> TrainResult:
    unit = trainer.task.count_unit
    return TrainResult(
        monitor=trainer.options.monitor, best_metric=trainer.state.best_metric, metrics=trainer.monitor.final_metrics(), test=test,
        history=trainer.monitor.history,
        best_checkpoint=trainer.checkpoints.best_checkpoint(trainer.state) if trainer.dist.is_main else None,
        last_checkpoint=trainer.checkpoints.last_path, run_dir=run_dir,
        global_step=trainer.state.global_step, epoch=trainer.state.epoch, wall_time_s=wall_time_s,
        throughput={f"{unit}_per_second": trainer.train_units / max(trainer.train_seconds, 1e-9)},
        stop_reason=trainer.state.stop_reason,
    )


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"run directory {run_dir} is not writable ({error.strerror}); "
                          "set hydra.run.dir=... to a writable place") from None


def current_run_dir(cfg: Any) -> Path:
    """Hydra's output directory inside a Hydra app; outputs/<name>/<time> otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / cfg.name / time.strftime("%Y-%m-%d_%H-%M-%S")


def find_resume(resume: str | None, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, loaded state) of the checkpoint ``resume`` points at: None, ``auto`` (the
    newest good checkpoint of this experiment: last.pt, best.pt, top-step*.pt) or a path."""
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoint.find_latest(run_dir.parent, exclude=run_dir)
        if found is None:
            raise ConfigError(f"resume=auto: no earlier checkpoint of this experiment under {run_dir.parent}/*/checkpoints/*.pt")
        return found
    state = checkpoint.load(resume)
    checkpoint.check_complete(state, resume)
    return Path(resume), state


def flat_hparams(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
