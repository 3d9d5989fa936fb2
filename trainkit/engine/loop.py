"""The training loop: ``Trainer.fit`` runs epochs of optimizer steps, ``train_step`` is the
life of one step (forward and backward over ``grad_accum_steps`` micro-batches, clip, the
non-finite check, step, schedule). Every ``log_every_n_steps`` the losses accumulated on the
device are read once. SIGTERM/SIGUSR1 finish the current step, write last.pt and exit 75.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.callbacks import Callback
from trainkit.core.devices import move_to, resolve_device
from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.core.logs import RunLogger
from trainkit.core.precision import Precision
from trainkit.core.ranks import Dist, gather_lists, sum_number
from trainkit.core.schema import TrainerConfig
from trainkit.core.sharding import compiled, full_norm
from trainkit.core.stop import stop_signals
from trainkit.data.sampler import set_epoch
from trainkit.engine.checkpoints import CheckpointManager, callback_names
from trainkit.engine.meter import LossMeter
from trainkit.engine.state import TrainerState
from trainkit.engine.stopping import NonFinitePolicy, StopRequests, skips_on_device
from trainkit.engine.validation import ValidationMonitor
from trainkit.schedulers import Schedule
from trainkit.tasks import ModelLossTask, SupervisedTask, Task
from trainkit.techniques.insight import LayerStats, Profiler


class Trainer:
    """The training loop for objects a user holds: a model, an optimizer, a loss or a task.

    ``options`` are the ``trainer`` config keys (``max_epochs``, ``grad_accum_steps``,
    ``clip_grad_norm``, ``monitor``, ...). Without ``run_dir`` nothing is written to disk.
    A model whose forward returns its own loss needs neither ``loss_fn`` nor ``task``.
    ``callbacks`` is a mapping from a name to a callback (each one's state is kept in
    checkpoints under its name) or a sequence (named by class, numbered when repeated).

    The loop (``fit``, ``train_step``) asks two parts for the rest: ``self.monitor``
    (``ValidationMonitor``: evaluation, best metric, early stopping, plateau scheduler) and
    ``self.checkpoints`` (``CheckpointManager``: last/best/top-k files, resume, lineage).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Any = None, *, task: Task | None = None, scheduler: Any = None,
                 precision: str | Precision = "fp32", device: str | torch.device | None = None,
                 dist: Dist | None = None, run_dir: str | Path | None = None,
                 callbacks: Sequence[Any] | Mapping[str, Any] = (), logger: RunLogger | None = None,
                 config_yaml: str = "", extra_state: dict[str, Any] | None = None,
                 histograms_every_n_steps: int | None = None, **options: Any):
        self.options = options = trainer_options(options)
        self.dist = dist or Dist(device=resolve_device(str(device or "cpu")))
        self.device = self.dist.device
        self.precision = precision = Precision.named(precision, self.device) if isinstance(precision, str) else precision
        self.model = precision.prepare_model(model.to(self.device))
        self.task = task or (SupervisedTask(loss_fn) if loss_fn is not None else ModelLossTask())
        self.optimizer, self.run_dir = optimizer, Path(run_dir) if run_dir is not None else None
        wrapped = self.dist.wrap(self.model)  # what the loop calls: DDP and/or compiled
        self.train_model = compiled(wrapped) if options.compile else wrapped  # FSDP: each block compiled
        # A task that is also a Callback (the VAE's beta controller) gets the hooks first, and
        # its state is saved in checkpoints like any callback's.
        named = {**({"task": self.task} if isinstance(self.task, Callback) else {}), **callback_names(callbacks)}
        self.callbacks = list(named.values())
        self.logger = logger or RunLogger(self.run_dir, enabled=self.dist.is_main)
        schedule = Schedule(scheduler, options.monitor)
        self.monitor = ValidationMonitor(options, self.task, precision, self.dist, self.logger, schedule)
        self.checkpoint_dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        parts = {"model": self.model, "optimizer": optimizer, "scheduler": schedule, "scaler": precision.scaler}
        self.checkpoints = CheckpointManager(self.checkpoint_dir, self.dist, self.logger, parts, named, {
            "config": config_yaml, **(extra_state or {})}, options.save_top_k, options.monitor_mode)
        # One lineage id for all ranks (rank 0's): best.pt is recognised by it on every rank.
        self.state = TrainerState(world_size=self.dist.world_size, lineage=gather_lists([uuid.uuid4().hex])[0])
        self.schedule, self.meter = schedule, LossMeter(self.device)
        self.grad_norm, self.total_steps = torch.zeros(()), options.max_steps or 0
        self.train_seconds = self.train_units = 0.0
        self.stops, self.layer_stats = StopRequests(self.dist, self.logger), LayerStats(histograms_every_n_steps, self.logger)
        self.nonfinite = NonFinitePolicy(options, self.logger, self.meter, self.checkpoints.last_file,
                                         on_device=skips_on_device(self.device, optimizer))

    # The loop -------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, val_loader: Iterable | None = None) -> list[dict[str, float]]:
        """Train until max_steps/max_epochs, early stopping or a stop request; returns the
        validation history. Raises ``Preempted`` after saving when asked to stop."""
        state, options = self.state, self.options
        self.total_steps = options.max_steps or options.max_epochs * math.ceil(len(train_loader) / options.grad_accum_steps)
        self.call("on_fit_start")
        self.logger.start_progress(self.total_steps, state.global_step)
        profiler = Profiler(options.profile, self.run_dir, options.profile_wait_steps,
                            options.profile_warmup_steps, options.profile_active_steps)
        with stop_signals():
            self.stops.raise_if_agreed("before its first step; nothing new to save")
            while state.stop_reason is None and not state.reached(options.max_steps, options.max_epochs):
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
                self.stops.raise_preempted(f"at step {state.global_step}; last.pt is resumable (resume=auto)")
            state.stop_reason = state.stop_reason or "finished"
            validate = val_loader is not None and not self.monitor.validated_at(state.global_step)
            self.checkpoint_after(self.validate(val_loader) if validate else False,
                                  not self.checkpoints.saved_at(state.global_step))
            self.stops.raise_if_agreed("after the final validation; last.pt holds the finished training (resume=auto tests it)")
        self.call("on_fit_end")
        return self.monitor.history

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
        applied = self.nonfinite.update(self.optimizer, scaler, self.grad_norm, self.state, sum(counts))
        for loss_sum, count, terms in losses:
            self.meter.add(loss_sum, count, terms, keep=applied)  # a skipped update's losses are not metered
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_step()
        self.state.global_step += 1
        seconds = time.perf_counter() - started
        self.meter.add_step(seconds)
        self.train_units += step_count
        self.train_seconds += seconds

    def after_step(self, val_loader: Iterable | None) -> None:
        """Log, evaluate, save and decide whether to stop, by the step counters."""
        state, options = self.state, self.options
        step = state.global_step
        self.logger.advance()
        self.call("on_step_end")
        if step % options.log_every_n_steps == 0:
            self.log_train()
        every = options.eval_every_n_steps
        improved = bool(every and step % every == 0 and val_loader is not None) and self.validate(val_loader)
        self.checkpoint_after(improved, bool(options.save_every_n_steps and step % options.save_every_n_steps == 0))
        if options.max_steps and step >= options.max_steps:
            state.stop_reason = "max_steps"
        if self.stops.agreed():  # every rank stops at the same step
            state.stop_reason = "preempted"
            self.checkpoint_after(False, True)

    def after_epoch(self, val_loader: Iterable | None) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.nonfinite.settle(self.state)
        epoch_loss = self.meter.read_epoch(self.dist)
        self.logger.log_metrics({"train/epoch_loss": epoch_loss}, self.state.global_step, self.state.epoch)
        by_steps = self.options.eval_every_n_steps is not None
        improved = not by_steps and val_loader is not None and self.validate(val_loader)
        self.checkpoint_after(improved, self.options.save_every_n_steps is None)

    def validate(self, val_loader: Iterable) -> bool:
        """Validate (the monitor), offer the value to the top-k ranking (the checkpoint
        manager), tell the callbacks; returns whether the monitored metric improved."""
        result = self.monitor.record(self.evaluate(val_loader, "val"), self.state)
        self.checkpoints.consider(result.value, self.state)
        self.call("on_evaluate_end", result.metrics)
        return result.improved

    def checkpoint_after(self, improved: bool, due: bool) -> None:
        """Save when due, when the metric improved, or when the validation ranks in the top k.
        Without validation, best.pt is the latest checkpoint."""
        if improved or due or self.checkpoints.wants_save:
            self.nonfinite.settle(self.state)  # a checkpoint never holds an unread non-finite step
            latest_is_best = self.state.best_step is None and not self.monitor.validated
            self.checkpoints.save(self.state, best=improved or latest_is_best)

    def log_train(self) -> None:
        self.nonfinite.settle(self.state)
        metrics = self.meter.train_metrics(self.dist, self.optimizer.param_groups[0]["lr"], self.grad_norm,
                                           self.task.count_unit)
        self.logger.log_metrics(metrics, self.state.global_step, self.state.epoch)
        self.logger.step_line(metrics, self.state.global_step, self.state.epoch, self.total_steps)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def request_stop(self) -> None:
        """Stop after the current step, writing a resumable checkpoint (as SIGTERM does)."""
        self.stops.request()

    # What a user of the Trainer asks for ------------------------------------------------------
    def evaluate(self, loader: Iterable, prefix: str = "val") -> dict[str, float]:
        """Loss and task metrics over a whole loader, exact across ranks."""
        return self.monitor.evaluate(self.model, loader, prefix)

    def test(self, loader: Iterable, use_best: bool = True) -> dict[str, float]:
        """Metrics on the test split, with the weights of this run's best.pt when there is one."""
        if use_best and self.checkpoint_dir is not None:
            if not self.checkpoints.load_best(self.model, self.state) and self.monitor.validated:
                self.logger.warning("no best.pt of this run in %s: testing the last weights", self.checkpoint_dir)
        return self.evaluate(loader, "test")

    def load_checkpoint(self, source: str | Path | dict[str, Any], path: str | Path | None = None) -> None:
        """Continue from a checkpoint (a file, or its loaded dict read from ``path``)."""
        self.state = self.checkpoints.resume(source, path)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write a resumable checkpoint to ``path`` (main rank only; atomic)."""
        return self.checkpoints.write(path, self.state)


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The total gradient norm (before clipping); clipped to ``max_norm`` unless it is None."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    norm = full_norm(torch.nn.utils.get_total_norm([p.grad for p in parameters]))  # FSDP: over every shard
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


def trainer_options(options: dict[str, Any]) -> TrainerConfig:
    """The ``trainer`` keys given to a Trainer, unknown ones refused with the closest name."""
    unknown = sorted(set(options) - set(TrainerConfig.__dataclass_fields__))
    if unknown:
        hint = did_you_mean(unknown[0], TrainerConfig.__dataclass_fields__, "trainer.")
        raise ConfigError(f"unknown key 'trainer.{unknown[0]}'{hint}")
    return TrainerConfig(**options)
