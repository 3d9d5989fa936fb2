"""The training loop: ``Trainer.fit`` runs epochs of optimizer steps, ``train_step`` is the
life of one step (forward and backward over ``grad_accum_steps`` micro-batches, clip, the
non-finite check, step, schedule). Every ``log_every_n_steps`` the losses accumulated on the
device are read once. SIGTERM/SIGUSR1 finish the current step, write last.pt and exit 75.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.__about__ import __version__
from trainkit.callbacks import Callback
from trainkit.core import checkpoint
from trainkit.core.checkpoint import load_weights
from trainkit.core.devices import eval_mode, move_to, peak_memory_mb, resolve_device
from trainkit.core.errors import ConfigError, Preempted, TrainingFailed, did_you_mean
from trainkit.core.logs import RunLogger
from trainkit.core.precision import Precision
from trainkit.core.ranks import Dist, gather_lists, sum_number
from trainkit.core.schema import TrainerConfig
from trainkit.core.stop import STOP, stop_signals
from trainkit.data.sampler import set_epoch
from trainkit.engine.checkpoints import (
    callback_names,
    check_optimizer_fits,
    read_verified,
    top_k_name,
    trainer_state_from,
)
from trainkit.engine.meter import LossMeter
from trainkit.engine.state import TrainerState
from trainkit.schedulers import Schedule
from trainkit.tasks import ModelLossTask, SupervisedTask, Task
from trainkit.techniques.insight import LayerStats, Profiler

log = logging.getLogger("trainkit")
# name -> (autocast dtype, gradient scaling, parameter dtype)
PRECISIONS = {"fp32": (None, False, None), "bf16": ("bfloat16", False, None), "fp16": ("float16", True, None),
              "fp64": (None, False, "float64")}




class Trainer:
    """The training loop for objects a user holds: a model, an optimizer, a loss or a task.

    ``options`` are the ``trainer`` config keys (``max_epochs``, ``grad_accum_steps``,
    ``clip_grad_norm``, ``monitor``, ...). Without ``run_dir`` nothing is written to disk.
    A model whose forward returns its own loss needs neither ``loss_fn`` nor ``task``.
    ``callbacks`` is a mapping from a name to a callback (each one's state is kept in
    checkpoints under its name) or a sequence (named by class, numbered when repeated).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Any = None, *, task: Task | None = None, scheduler: Any = None,
                 precision: str | Precision = "fp32", device: str | torch.device | None = None,
                 dist: Dist | None = None, run_dir: str | Path | None = None,
                 callbacks: Sequence[Any] | Mapping[str, Any] = (), logger: RunLogger | None = None,
                 config_yaml: str = "", extra_state: dict[str, Any] | None = None,
                 histograms_every_n_steps: int | None = None, **options: Any):
        unknown = sorted(set(options) - set(TrainerConfig.__dataclass_fields__))
        if unknown:
            hint = did_you_mean(unknown[0], TrainerConfig.__dataclass_fields__, "trainer.")
            raise ConfigError(f"unknown key 'trainer.{unknown[0]}'{hint}")
        self.options = TrainerConfig(**options)
        self.dist = dist or Dist(device=resolve_device(str(device or "cpu")))
        self.device = self.dist.device
        if isinstance(precision, str):
            autocast_dtype, grad_scaling, param_dtype = PRECISIONS[precision]
            precision = Precision(self.device, autocast_dtype, grad_scaling, precision, param_dtype)
        self.precision = precision
        self.model = precision.prepare_model(model.to(self.device))
        self.task = task or (SupervisedTask(loss_fn) if loss_fn is not None else ModelLossTask())
        self.optimizer = optimizer
        self.schedule = Schedule(scheduler, self.options.monitor)
        self.train_model = self.dist.wrap(self.model)  # what the loop calls: DDP and/or compiled
        if self.options.compile:
            self.train_model = torch.compile(self.train_model)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        # A task that is also a Callback (the VAE's beta controller) gets the hooks first, and
        # its state is saved in checkpoints like any callback's.
        self.named_callbacks = {**({"task": self.task} if isinstance(self.task, Callback) else {}),
                                **callback_names(callbacks)}
        self.callbacks = list(self.named_callbacks.values())
        self.logger = logger or RunLogger(self.run_dir, enabled=self.dist.is_main)
        self.config_yaml, self.extra_state = config_yaml, extra_state or {}
        # One lineage id for all ranks (rank 0's): best.pt is recognised by it on every rank.
        self.state = TrainerState(world_size=self.dist.world_size, lineage=gather_lists([uuid.uuid4().hex])[0])
        self.history: list[dict[str, float]] = []
        self.meter = LossMeter(self.device)
        self.grad_norm = torch.zeros(())
        self.last_eval_step = self.last_save_step = -1
        self.train_seconds = self.train_units = 0.0
        self.stop_requested = False
        self.top_k_candidate: float | None = None  # the last evaluation's value, when it ranks in the top k
        self.layer_stats = LayerStats(histograms_every_n_steps, self.logger)

    # The loop -------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None) -> list[dict[str, float]]:
        """Train until max_steps/max_epochs, early stopping or a stop request; returns the
        validation history. Raises ``Preempted`` after saving when asked to stop."""
        state, options = self.state, self.options
        self.total_steps = options.max_steps or options.max_epochs * math.ceil(
            len(train_loader) / options.grad_accum_steps)
        self.call("on_fit_start")
        self.logger.start_progress(self.total_steps, state.global_step)
        profiler = Profiler(options.profile, self.run_dir, options.profile_wait_steps,
                            options.profile_warmup_steps, options.profile_active_steps)
        with stop_signals():
            self.stop_if_requested("before its first step; nothing new to save")
            while state.stop_reason is None and not self.finished():
                set_epoch(train_loader, state.epoch, state.batch_in_epoch)
                first_batch, steps_before = state.batch_in_epoch, state.global_step
                for micro_batches in chunked(train_loader, options.grad_accum_steps):
                    self.train_step(micro_batches)
                    profiler.step()
                    state.batch_in_epoch += len(micro_batches)
                    self.after_step(val_loader)
                    if state.stop_reason is not None:
                        break
                else:
                    if first_batch == 0 and state.global_step == steps_before:
                        raise ConfigError(f"the training data gives no batches in epoch {state.epoch} "
                                          "(an empty train split, or data.batch_size larger than it with drop_last)")
                    self.after_epoch(val_loader)
            profiler.stop()
            if state.stop_reason == "preempted":
                self.raise_preempted(f"at step {state.global_step}; last.pt is resumable (resume=auto)")
            state.stop_reason = state.stop_reason or "finished"
            improved = False
            if val_loader is not None and self.last_eval_step != state.global_step:
                improved = self.validate(val_loader)
            if improved or self.top_k_candidate is not None or self.last_save_step != state.global_step:
                self.save(best=improved)
            self.stop_if_requested("after the final validation; last.pt holds the finished training (resume=auto tests it)")
        self.call("on_fit_end")
        return self.history

    def train_step(self, micro_batches: list[Any]) -> None:
        """One optimizer step: forward and backward over the micro-batches, clip, step, schedule."""
        started = time.perf_counter()
        model, scaler = self.train_model, self.precision.scaler
        if not (model.training and self.model.training):  # the wrapper's flag and the model's
            model.train()  # only then: it walks every submodule (and would unfreeze a frozen one)
        counts = [self.task.count(batch) for batch in micro_batches]
        # Each micro-batch loss is a sum; divide by the step's count over all micro-batches and
        # ranks so the summed gradients equal the large-batch mean (DDP then averages ranks).
        step_count = sum_number(self.dist, sum(counts))
        normaliser = step_count / self.dist.world_size
        losses = []  # (loss sum, count, terms) per micro-batch: metered only if the update is applied
        for index, (batch, count) in enumerate(zip(micro_batches, counts)):
            if self.device.type != "cpu":  # loaders yield CPU tensors: nothing to move on a CPU
                batch = move_to(batch, self.device)
            batch = self.precision.prepare_batch(batch)
            with self.dist.no_sync(model, skip_sync=index < len(micro_batches) - 1):
                loss_sum, terms = self.task.forward_backward(model, batch, normaliser, self.precision)
            losses.append((loss_sum.detach(), count, terms))
        scaler.unscale_(self.optimizer)
        self.grad_norm = clip_gradients(self.model.parameters(), self.options.clip_grad_norm)
        self.layer_stats.maybe_log(self.model, self.state.global_step + 1)
        if self.update_is_finite():
            scaler.step(self.optimizer)
            scaler.update()
            for loss_sum, count, terms in losses:
                self.meter.add(loss_sum, count, terms)
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()
        self.state.global_step += 1
        seconds = time.perf_counter() - started
        self.meter.add_step(seconds)
        self.train_units += step_count
        self.train_seconds += seconds

    def update_is_finite(self) -> bool:
        """The non-finite check, before the update is applied. fp16's scaler checks (and
        skips) by itself; otherwise the norm is read: free on CPU, where no sync exists, and a
        4-byte read per step on an accelerator (as GradScaler does)."""
        if self.precision.scaler.is_enabled() or math.isfinite(float(self.grad_norm)):
            self.state.consecutive_skips = 0
            return True
        step = self.state.global_step + 1
        last = self.checkpoint_dir / "last.pt" if self.checkpoint_dir and (self.checkpoint_dir / "last.pt").exists() else None
        where = f"non-finite loss or gradient at step {step} (epoch {self.state.epoch})"
        if self.options.nan_policy == "error":
            raise TrainingFailed(f"{where}; the update was not applied. Last good checkpoint: {last or 'none yet'} "
                                 "(trainer.nan_policy=skip drops such steps instead)")
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        self.logger.info("skipped the update of step %d: non-finite loss or gradient (%d skipped so far)",
                         step, self.state.skipped_steps)
        if self.state.consecutive_skips >= self.options.max_consecutive_skips:
            raise TrainingFailed(f"{where}: {self.state.consecutive_skips} non-finite steps in a row "
                                 f"(trainer.max_consecutive_skips={self.options.max_consecutive_skips}). "
                                 f"Last good checkpoint: {last or 'none yet'}")
        return False

    def after_step(self, val_loader: Iterable | None) -> None:
        """Log, evaluate, save and decide whether to stop, by the step counters."""
        state, options = self.state, self.options
        step = state.global_step
        self.logger.advance()
        self.call("on_step_end")
        if step % options.log_every_n_steps == 0:
            self.log_train()
        improved = False
        if options.eval_every_n_steps and step % options.eval_every_n_steps == 0 and val_loader is not None:
            improved = self.validate(val_loader)
        if improved or self.top_k_candidate is not None or (
                options.save_every_n_steps and step % options.save_every_n_steps == 0):
            self.save(best=improved)
        if options.max_steps and step >= options.max_steps:
            state.stop_reason = "max_steps"
        if self.dist.any(self.stop_pending()):  # every rank stops at the same step
            state.stop_reason = "preempted"
            self.save()

    def after_epoch(self, val_loader: Iterable | None) -> None:
        state, options = self.state, self.options
        state.epoch += 1
        state.batch_in_epoch = 0
        epoch_loss = self.meter.read_epoch(self.dist)
        self.logger.log_metrics({"train/epoch_loss": epoch_loss}, state.global_step, state.epoch)
        improved = False
        if options.eval_every_n_steps is None and val_loader is not None:
            improved = self.validate(val_loader)
        if improved or self.top_k_candidate is not None or options.save_every_n_steps is None:
            self.save(best=improved)

    def finished(self) -> bool:
        if self.options.max_steps:
            return self.state.global_step >= self.options.max_steps
        return self.state.epoch >= self.options.max_epochs

    def request_stop(self) -> None:
        """Stop after the current step, writing a resumable checkpoint (as SIGTERM does)."""
        self.stop_requested = True

    def stop_pending(self) -> bool:
        """Asked to stop: by ``request_stop`` or by SIGTERM/SIGUSR1 (at any moment of the run)."""
        return self.stop_requested or STOP.requested

    def stop_if_requested(self, where: str) -> None:
        """Raise ``Preempted`` on every rank if any rank was asked to stop (between phases,
        where the files on disk are already what a resume needs)."""
        if self.dist.any(self.stop_pending()):
            self.raise_preempted(where)

    def raise_preempted(self, where: str) -> None:
        self.logger.close()
        STOP.clear()  # handled: a later run in this process starts afresh
        self.stop_requested = False
        raise Preempted(f"stopped on request {where}")

    # Logging and evaluation -----------------------------------------------------------------
    def log_train(self) -> None:
        steps, seconds = self.meter.steps, self.meter.seconds
        values, units = self.meter.read(self.dist)  # waits for the device: only every N steps
        metrics = {
            **values,
            "train/learning_rate": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": float(self.grad_norm),
            f"train/{self.task.count_unit}_per_second": units / max(seconds, 1e-9),
            "train/step_time_ms": 1000 * seconds / max(1, steps),
            "train/peak_memory_mb": peak_memory_mb(self.device),
        }
        self.logger.log_metrics(metrics, self.state.global_step, self.state.epoch)
        self.logger.step_line(metrics, self.state.global_step, self.state.epoch, self.total_steps)

    @torch.no_grad()
    def evaluate(self, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """Loss and task metrics over a whole loader, exact across ranks."""
        model = self.model
        self.task.eval_start(self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with eval_mode(model):
            for batch in loader:
                count += self.task.count(batch)
                with self.precision.autocast():
                    batch = self.precision.prepare_batch(move_to(batch, self.device))
                    loss_sum += self.task.eval_step(model, batch).double()
        totals = self.dist.sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64, device=self.device)]))
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        metrics = {"loss": loss, **self.task.eval_metrics(loss)}
        return {f"{prefix}/{name}": value for name, value in metrics.items()}

    def validate(self, val_loader: Iterable) -> bool:
        """Evaluate, log, step a plateau scheduler, track best and early stopping.
        Returns whether the monitored metric improved."""
        state, options = self.state, self.options
        metrics = self.evaluate(val_loader, "val")
        metrics["val/epoch_loss"] = metrics["val/loss"]
        self.last_eval_step = state.global_step
        self.history.append({"step": state.global_step, "epoch": state.epoch, **metrics})
        self.logger.log_metrics(metrics, state.global_step, state.epoch)
        self.logger.info("validation  epoch %d  step %d  %s", state.epoch, state.global_step,
                         "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "val/epoch_loss"))
        text = self.task.eval_text()
        if text:
            self.logger.log_text("val/samples", text, state.global_step)
            self.logger.info("sample translations:\n%s", text)
        if options.monitor not in metrics:
            raise ConfigError(f"trainer.monitor={options.monitor!r} is not a validation metric; "
                              f"choose from {sorted(metrics)}")
        value = metrics[options.monitor]
        self.schedule.after_eval(metrics)
        improved = self.is_improvement(value)
        self.top_k_candidate = value if self.enters_top_k(value) else None
        if improved:
            state.best_metric, state.best_step = value, state.global_step
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
            patience = options.early_stopping_patience
            if patience is not None and state.evals_without_improvement >= patience:
                state.stop_reason = "early_stopping"
                self.logger.info("early stopping: %s did not improve for %d evaluations (best %.6g at step %s)",
                                 options.monitor, patience, state.best_metric, state.best_step)
        self.call("on_evaluate_end", metrics)
        return improved

    def enters_top_k(self, value: float) -> bool:
        """Whether a checkpoint with this monitored value belongs among the ``save_top_k`` best
        (any evaluation may, not only an improvement on the best)."""
        k = self.options.save_top_k
        if k <= 1 or not math.isfinite(value):
            return False
        if len(self.state.top_k) < k:
            return True
        worst = self.state.top_k[-1][0]
        return value < worst if self.options.monitor_mode == "min" else value > worst

    def is_improvement(self, value: float) -> bool:
        best, delta = self.state.best_metric, self.options.early_stopping_min_delta
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best - delta if self.options.monitor_mode == "min" else value > best + delta

    def test(self, loader: Iterable, use_best: bool = True) -> dict[str, float]:
        """Metrics on the test split, with the weights of this run's best.pt when there is one."""
        if use_best and self.checkpoint_dir is not None:
            self.dist.barrier()  # every rank, before looking: rank 0 may still be writing best.pt
            best = self.best_checkpoint()
            saved = read_verified(best) if best is not None else None  # one verified read: the weights
            if saved is not None and self.is_lineage_best(saved.get("trainer_state", {})):
                self.model.load_state_dict(saved["model"])
            elif self.history:
                self.logger.warning("no best.pt of this run in %s: testing the last weights", self.checkpoint_dir)
        return self.evaluate(loader, "test")

    def best_checkpoint(self) -> Path | None:
        """``checkpoints/best.pt`` if it is this run's best: written by this run's lineage (the
        run and the runs it was resumed from) at the best step. A best.pt of another run left
        in the same directory is never used. A cheap look (memory-mapped, unverified): whoever
        uses the weights reads them verified."""
        path = self.checkpoint_dir / "best.pt" if self.checkpoint_dir is not None else None
        if path is None or not path.is_file():
            return None
        try:
            saved = checkpoint.read(path, mmap=True).get("trainer_state", {})
        except ConfigError:
            return None
        return path if self.is_lineage_best(saved) else None

    def is_lineage_best(self, saved: dict[str, Any]) -> bool:
        """Whether a checkpoint's trainer_state is this lineage's best (or, without validation, latest)."""
        step = self.state.best_step if self.state.best_step is not None else self.state.global_step
        return saved.get("lineage", "") == self.state.lineage and saved.get("global_step") == step

    # Checkpoints ----------------------------------------------------------------------------
    def checkpoint_state(self, rng_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One plain dict, loadable with torch.load(weights_only=True), enough to resume exactly.
        ``rng_ranks``: every rank's RNG states, in rank order (this process's alone by default)."""
        rng = checkpoint.capture_rng()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
            "trainer_state": asdict(self.state),
            "rng": rng,
            "rng_ranks": rng_ranks or [rng],
            "config": self.config_yaml,
            "trainkit_version": __version__,
            "callbacks": {name: cb.state_dict() for name, cb in self.named_callbacks.items() if hasattr(cb, "state_dict")},
            **self.extra_state,
        }

    def save_checkpoint(self, path: str | Path, rng_ranks: list[dict[str, Any]] | None = None) -> Path:
        """Write a resumable checkpoint to ``path`` (main rank only; atomic)."""
        path = Path(path)
        if self.dist.is_main:
            checkpoint.save(self.checkpoint_state(rng_ranks), path)
        return path

    def save(self, best: bool = False) -> None:
        """last.pt, plus best.pt when the monitored metric improved and a top-k file when the
        last evaluation ranks among the ``save_top_k`` best. Called by every rank (it gathers
        every rank's RNG states); rank 0 writes."""
        self.last_save_step = self.state.global_step
        rng_ranks = gather_lists([checkpoint.capture_rng()])  # a collective: before any rank returns
        candidate, self.top_k_candidate = self.top_k_candidate, None
        stale = self.rank_top_k(candidate) if candidate is not None else []
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        last = self.save_checkpoint(self.checkpoint_dir / "last.pt", rng_ranks)
        if best or (self.state.best_step is None and not self.history):  # without validation, best is the latest
            checkpoint.link(last, self.checkpoint_dir / "best.pt")
        if candidate is not None:
            checkpoint.link(last, self.checkpoint_dir / top_k_name(self.state.global_step))
        for name in stale:
            (self.checkpoint_dir / name).unlink(missing_ok=True)

    def rank_top_k(self, value: float) -> list[str]:
        """Put this step's checkpoint among the top k (before last.pt is written, so last.pt
        holds the new ranking); returns the names that fell out."""
        ranked = sorted([*self.state.top_k, [value, top_k_name(self.state.global_step)]],
                        key=lambda item: item[0], reverse=self.options.monitor_mode == "max")
        self.state.top_k = ranked[: self.options.save_top_k]
        return [name for _, name in ranked[self.options.save_top_k:]]

    def load_checkpoint(self, source: str | Path | dict[str, Any], path: str | Path | None = None) -> None:
        """Continue from a checkpoint (a file, or its loaded dict read from ``path``):
        weights, optimizer, scheduler, scaler, position, RNGs."""
        path = path or (source if not isinstance(source, dict) else "checkpoint")
        state = source if isinstance(source, dict) else checkpoint.load(source)
        checkpoint.check_complete(state, path)
        load_weights(self.model, state["model"], path)
        check_optimizer_fits(self.optimizer, state["optimizer"], path)
        parts = [("optimizer", self.optimizer), ("scheduler", self.schedule),
                 *([("scaler", self.precision.scaler)] if state["scaler"] else [])]
        for key, part in parts:
            try:
                part.load_state_dict(state[key])
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
                raise ConfigError(f"{path}: its {key} state does not fit the configured {key} "
                                  f"({type(error).__name__}: {error}); resume with the {key} it was trained "
                                  "with, or start from its weights only with init_from=...") from None
        saved = trainer_state_from(state["trainer_state"], path)
        if saved.world_size != self.dist.world_size and saved.batch_in_epoch:
            raise ConfigError(
                f"{path}: written by {saved.world_size} process(es) in the middle of an epoch; resume it "
                f"with distributed.nproc_per_node={saved.world_size} (a different count is allowed "
                "only from an end-of-epoch checkpoint)")
        self.state = saved
        self.state.stop_reason = None
        self.state.world_size = self.dist.world_size
        self.load_callbacks(state.get("callbacks") or {})
        self.restore_rngs(state)
        if not isinstance(source, dict) or path != "checkpoint":
            self.adopt_lineage_files(Path(path))
        self.logger.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", path,
                         self.state.epoch, self.state.global_step, self.state.batch_in_epoch)

    def load_callbacks(self, saved: dict[str, Any]) -> None:
        """Each callback's state by its name (checkpoints before names: by class name)."""
        for name, callback in self.named_callbacks.items():
            own = saved.get(name, saved.get(type(callback).__name__))
            if own is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(own)

    def restore_rngs(self, state: dict[str, Any]) -> None:
        """This rank's RNG states. A rank the checkpoint has no states for (a larger world, or
        a file from before per-rank states) keeps its own seeded generators."""
        per_rank = state.get("rng_ranks") or [state["rng"]]
        if self.dist.rank < len(per_rank):
            checkpoint.restore_rng(per_rank[self.dist.rank])
        else:
            self.logger.warning("rank %d: the checkpoint holds RNG states for %d rank(s); this rank keeps "
                                "its own seeded generators", self.dist.rank, len(per_rank))

    def adopt_lineage_files(self, source: Path) -> None:
        """Resuming into another run directory: this lineage's best.pt and top-k files come
        along (hard links, else copies), so best.pt is always the best of the whole lineage."""
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        source_dir = source.resolve().parent
        if source_dir == self.checkpoint_dir.resolve():
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        candidates = [source_dir / "best.pt", source]
        best = next((c for c in candidates if c.is_file() and self.is_lineage_best(
            (read_verified(c) or {}).get("trainer_state", {}))), None)
        if best is not None:
            checkpoint.link(best, self.checkpoint_dir / "best.pt")
        elif self.state.best_step is not None:
            self.logger.warning("resume: the best checkpoint of this run (step %d) is not in %s; best.pt "
                                "appears at the next improvement", self.state.best_step, source_dir)
        kept = []
        for value, name in self.state.top_k:
            if (source_dir / name).is_file():
                checkpoint.link(source_dir / name, self.checkpoint_dir / name)
                kept.append([value, name])
        self.state.top_k = kept

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)




# train_model ------------------------------------------------------------------------------------

def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm (before clipping); clipped to ``max_norm`` unless it is None."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def chunked(loader: Iterable, size: int) -> Iterator[list[Any]]:
    """Group micro-batches into optimizer steps; the last group of an epoch may be shorter."""
    group: list[Any] = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
