"""The checkpoint manager: which files a run writes (last.pt, best.pt, top-k), resuming
from one, the run directory's lineage and every callback's state. The file format itself
(atomic writes, checksums, safe loading) is ``trainkit.core.checkpoint``."""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainkit.__about__ import __version__
from trainkit.core import checkpoint
from trainkit.core.checkpoint import load_weights
from trainkit.core.errors import ConfigError
from trainkit.core.logs import RunLogger
from trainkit.core.ranks import Dist, gather_lists
from trainkit.engine.state import TrainerState

log = logging.getLogger("trainkit")


def read_verified(path: Path, weights: bool = True) -> dict[str, Any] | None:
    """A checkpoint that passes its checks, or None (warned) when it does not."""
    try:
        return checkpoint.load(path, weights=weights)
    except ConfigError as error:
        log.warning("%s; not used as this run's best checkpoint", error)
        return None


def check_optimizer_fits(optimizer: torch.optim.Optimizer, saved: Any, path: Any) -> None:
    """A checkpoint's optimizer state must be of the configured optimizer: the same settings
    in every parameter group (torch would load Adam's groups into SGD and fail at the step)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    not_settings = {"params", "initial_lr"}  # initial_lr belongs to the scheduler
    ours = [set(group) - not_settings for group in optimizer.state_dict()["param_groups"]]
    theirs = [set(group) - not_settings for group in groups if isinstance(group, dict)] if isinstance(groups, list) else []
    if theirs != ours:
        differ = sorted(set().union(*theirs, *ours) - (set.intersection(*theirs, *ours) if theirs and ours else set()))
        raise ConfigError(f"{path}: its optimizer state is not of the configured {type(optimizer).__name__} "
                          f"({len(theirs)} vs {len(ours)} parameter groups; settings that differ: "
                          f"{', '.join(differ) or 'none'}); resume with the optimizer it was trained with, or "
                          "start from its weights only with init_from=...")


def top_k_name(step: int, suffix: str = ".pt") -> str:
    return f"top-step{step:08d}{suffix}"


def trainer_state_from(saved: Any, path: Any) -> TrainerState:
    """A checkpoint's trainer_state, checked: unknown keys are ignored, wrong types refused."""
    known = TrainerState.__dataclass_fields__
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in ("epoch", "global_step")):
        raise ConfigError(f"checkpoint {path}: its trainer_state is not a trainkit trainer state")
    return TrainerState(**{key: value for key, value in saved.items() if key in known})


def callback_names(callbacks: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """Callbacks by name: a mapping as given; a sequence by class name, numbered when repeated."""
    if isinstance(callbacks, Mapping):
        return dict(callbacks)
    classes = [type(callback).__name__ for callback in callbacks]
    return {(name if classes.count(name) == 1 else f"{name}.{classes[:index].count(name)}"): callback
            for index, (name, callback) in enumerate(zip(classes, callbacks))}


class CheckpointFolder:
    """Names in a run's ``checkpoints/`` folder that hold what another name holds (best.pt is
    last.pt at its step): hard links to files, symbolic links to sharded folders."""

    def __init__(self, directory: Path):
        self.directory = directory

    def link(self, source: Path, name: str) -> None:
        """``name`` holds what ``source`` holds: a hard link to a file, a symbolic link to a folder."""
        if source.is_dir():
            checkpoint.point(self.directory / name, source)
        else:
            checkpoint.link(source, self.directory / name)

    def adopt(self, source: Path, name: str) -> None:
        """``source`` (another run's) as ``name`` here: a file hard-linked (else copied); a sharded
        folder's files hard-linked into a folder of the same name, and ``name`` a link to it."""
        if not checkpoint.is_sharded(source):
            checkpoint.link(source, self.directory / name)
            return
        folder = source.resolve()
        target = self.directory / folder.name
        if not target.exists():
            temporary = self.directory / f".{folder.name}.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            shutil.copytree(folder, temporary, copy_function=hard_link_or_copy)
            os.replace(temporary, target)
        checkpoint.point(self.directory / name, target)

    def adopt_lineage(self, source: Path, state: TrainerState, suffix: str, logger: RunLogger) -> None:
        """Resuming into another run directory: this lineage's best.pt and top-k files come
        along (hard links, else copies), so best.pt is always the best of the whole lineage."""
        source_dir = source.resolve().parent
        if source_dir == self.directory.resolve():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        best = next((c for c in (source_dir / f"best{suffix}", source) if c.exists() and is_lineage_best(
            (read_verified(c, weights=False) or {}).get("trainer_state", {}), state)), None)
        if best is not None:
            self.adopt(best, f"best{suffix}")
        elif state.best_step is not None:
            logger.warning("resume: the best checkpoint of this run (step %d) is not in %s; best.pt "
                           "appears at the next improvement", state.best_step, source_dir)
        kept = [[value, name] for value, name in state.top_k if (source_dir / name).exists()]
        for _, name in kept:
            self.adopt(source_dir / name, name)
        state.top_k = kept


class CheckpointManager:
    """The files of a run's ``checkpoints/`` folder and what goes into them.

    ``parts`` are the stateful objects a checkpoint holds by key (model, optimizer,
    scheduler, scaler), ``callbacks`` each callback by the name its state is kept under,
    ``static`` the entries written unchanged (config, version, data state). Without a
    ``directory`` nothing is written. Of the run's ``TrainerState`` it changes ``top_k`` (and,
    on resume, sets ``world_size`` to this run's). Every rank calls ``save`` (it gathers every rank's RNG states);
    rank 0 writes. Under FSDP (``dist.sharded``) every rank writes its shards and the names lose
    their ``.pt``: ``last``, ``best`` and ``top-step*`` are links to sharded folders (``core.checkpoint``).
    """

    def __init__(self, directory: Path | None, dist: Dist, logger: RunLogger, parts: dict[str, Any],
                 callbacks: dict[str, Any], static: dict[str, Any], save_top_k: int = 1, monitor_mode: str = "min"):
        self.directory, self.dist, self.logger = directory, dist, logger
        self.parts, self.callbacks, self.static = parts, callbacks, static
        self.save_top_k, self.monitor_mode = save_top_k, monitor_mode
        self.candidate: float | None = None  # the last evaluation's value, when it ranks in the top k
        self.last_step = -1  # the step of the last save
        self.sharded = dist.sharded
        self.suffix = "" if self.sharded else ".pt"
        self.folder = CheckpointFolder(directory) if directory is not None else None

    # Saving -------------------------------------------------------------------------------
    def consider(self, value: float, state: TrainerState) -> None:
        """After a validation: whether its checkpoint belongs among the ``save_top_k`` best
        (any evaluation may, not only an improvement on the best)."""
        k, ranked = self.save_top_k, state.top_k
        fits = k > 1 and math.isfinite(value) and (len(ranked) < k or self.better(value, ranked[-1][0]))
        self.candidate = value if fits else None

    def saved_at(self, step: int) -> bool:
        return self.last_step == step

    @property
    def last_path(self) -> Path | None:
        return self.directory / f"last{self.suffix}" if self.directory is not None else None

    def last_file(self) -> Path | None:
        """last.pt when one was written (the last good checkpoint an error message names)."""
        last = self.last_path
        return last if last is not None and last.exists() else None

    @property
    def wants_save(self) -> bool:
        """The last validation ranks among the top k: the next save writes its file."""
        return self.candidate is not None

    def better(self, value: float, other: float) -> bool:
        return value < other if self.monitor_mode == "min" else value > other

    def state_dict(self, state: TrainerState, rng_ranks: list[dict[str, Any]] | None = None,
                   skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """One plain dict, loadable with torch.load(weights_only=True), enough to resume exactly.
        ``rng_ranks``: every rank's RNG states, in rank order (this process's alone by default);
        ``skip``: parts left out (a sharded save writes the model and optimizer with DCP)."""
        rng = checkpoint.capture_rng()
        return {
            **{key: part.state_dict() for key, part in self.parts.items() if key not in skip},
            "trainer_state": asdict(state), "rng": rng, "rng_ranks": rng_ranks or [rng],
            "trainkit_version": __version__,
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items() if hasattr(cb, "state_dict")},
            **self.static,
        }

    def write(self, path: str | Path, state: TrainerState, rng_ranks: list[dict[str, Any]] | None = None) -> Path:
        """Write a resumable checkpoint to ``path`` (main rank only; atomic). Sharded: every rank
        writes a folder beside ``path`` and ``path`` becomes a link to it; returns the folder."""
        path = Path(path)
        if self.sharded:
            token = gather_lists([uuid.uuid4().hex[:8]])[0]  # one folder name on every rank
            return checkpoint.save_sharded(path, self.parts["model"], self.parts["optimizer"],
                                           self.state_dict(state, rng_ranks, skip=("model", "optimizer")),
                                           f"step{state.global_step:08d}-{token}", self.dist.is_main)
        if self.dist.is_main:
            checkpoint.save(self.state_dict(state, rng_ranks), path)
        return path

    def save(self, state: TrainerState, best: bool = False) -> None:
        """last.pt, plus best.pt when ``best`` and a top-k file when the last validation ranks
        among the ``save_top_k`` best."""
        self.last_step = state.global_step
        rng_ranks = gather_lists([checkpoint.capture_rng()])  # a collective: before any rank returns
        candidate, self.candidate = self.candidate, None
        stale = self.rank_top_k(candidate, state) if candidate is not None else []
        if self.directory is None or not (self.dist.is_main or self.sharded):
            return
        last = self.write(self.last_path, state, rng_ranks)
        if not self.dist.is_main:
            return
        if best:
            self.folder.link(last, f"best{self.suffix}")
        if candidate is not None:
            self.folder.link(last, top_k_name(state.global_step, self.suffix))
        for name in stale:
            (self.directory / name).unlink(missing_ok=True)
        checkpoint.remove_unlinked(self.directory)  # also a sharded best adopted by a 1-process resume, once replaced

    def rank_top_k(self, value: float, state: TrainerState) -> list[str]:
        """Put this step's checkpoint among the top k (before last.pt is written, so last.pt
        holds the new ranking); returns the names that fell out."""
        ranked = sorted([*state.top_k, [value, top_k_name(state.global_step, self.suffix)]],
                        key=lambda item: item[0], reverse=self.monitor_mode == "max")
        state.top_k = ranked[: self.save_top_k]
        return [name for _, name in ranked[self.save_top_k:]]

    # Resuming -----------------------------------------------------------------------------
    def resume(self, source: str | Path | dict[str, Any], path: str | Path | None = None) -> TrainerState:
        """Continue from a checkpoint (a file, or its loaded dict read from ``path``): every
        part, the callbacks and this rank's RNGs come back; returns the saved trainer state.
        Resuming into another run directory brings this lineage's best and top-k files along."""
        path = path or (source if not isinstance(source, dict) else "checkpoint")
        saved = source if isinstance(source, dict) else checkpoint.load(source, weights=False)
        checkpoint.check_complete(saved, path)
        self.load_parts(saved, path)
        state = trainer_state_from(saved["trainer_state"], path)
        if state.world_size != self.dist.world_size and state.batch_in_epoch:
            raise ConfigError(
                f"{path}: written by {state.world_size} process(es) in the middle of an epoch; resume it "
                f"with distributed.nproc_per_node={state.world_size} (a different count is allowed "
                "only from an end-of-epoch checkpoint)")
        state.stop_reason, state.world_size = None, self.dist.world_size
        self.load_callbacks(saved.get("callbacks") or {})
        self.restore_rngs(saved)
        if not isinstance(source, dict) or path != "checkpoint":
            self.adopt_lineage_files(Path(path), state)
        self.logger.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", path,
                         state.epoch, state.global_step, state.batch_in_epoch)
        return state

    def load_parts(self, saved: dict[str, Any], path: Any) -> None:
        if "sharded" in saved:  # DCP puts the shards this rank holds (any world size) into the live objects
            checkpoint.load_into(path, self.parts["model"], self.parts["optimizer"])
        elif self.sharded:
            raise ConfigError(f"{path}: a single-file checkpoint cannot resume a sharded run (distributed.strategy=fsdp); "
                              f"resume it with strategy ddp, or start from its weights with init_from={path}")
        else:
            load_weights(self.parts["model"], saved["model"], path)
            check_optimizer_fits(self.parts["optimizer"], saved["optimizer"], path)
        loaded = ("model", "optimizer") if "sharded" in saved else ("model",)
        for key, part in self.parts.items():
            if key in loaded or (key == "scaler" and not saved.get(key)):
                continue
            try:
                part.load_state_dict(saved[key])
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
                raise ConfigError(f"{path}: its {key} state does not fit the configured {key} "
                                  f"({type(error).__name__}: {error}); resume with the {key} it was trained "
                                  "with, or start from its weights only with init_from=...") from None

    def load_callbacks(self, saved: dict[str, Any]) -> None:
        """Each callback's state by its name (checkpoints before names: by class name)."""
        for name, callback in self.callbacks.items():
            own = saved.get(name, saved.get(type(callback).__name__))
            if own is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(own)

    def restore_rngs(self, saved: dict[str, Any]) -> None:
        """This rank's RNG states. A rank the checkpoint has no states for (a larger world, or
        a file from before per-rank states) keeps its own seeded generators."""
        per_rank = saved.get("rng_ranks") or [saved["rng"]]
        if self.dist.rank < len(per_rank):
            checkpoint.restore_rng(per_rank[self.dist.rank])
        else:
            self.logger.warning("rank %d: the checkpoint holds RNG states for %d rank(s); this rank keeps "
                                "its own seeded generators", self.dist.rank, len(per_rank))

    def adopt_lineage_files(self, source: Path, state: TrainerState) -> None:
        """Resuming into another run directory: this lineage's best and top-k checkpoints come along."""
        if self.folder is not None and self.dist.is_main:
            self.folder.adopt_lineage(source, state, self.suffix, self.logger)

    # The best checkpoint ------------------------------------------------------------------
    def best_checkpoint(self, state: TrainerState) -> Path | None:
        """``best.pt`` if it is this run's best: written by this run's lineage (the run and the
        runs it was resumed from) at the best step. A best.pt of another run left in the same
        directory is never used. A cheap look (memory-mapped, unverified): whoever uses the
        weights reads them verified."""
        path = self.directory / f"best{self.suffix}" if self.directory is not None else None
        if path is None or not path.exists():
            return None
        try:
            saved = checkpoint.read(path, mmap=True).get("trainer_state", {})
        except ConfigError:
            return None
        return path if is_lineage_best(saved, state) else None

    def load_best(self, model: nn.Module, state: TrainerState) -> bool:
        """Put this run's best weights into ``model``; False when there is no such best.pt."""
        if self.directory is None:
            return False
        self.dist.barrier()  # every rank, before looking: rank 0 may still be writing best.pt
        best = self.best_checkpoint(state)
        sharded = best is not None and checkpoint.is_sharded(best)
        saved = read_verified(best, weights=not sharded) if best is not None else None  # one verified read
        if saved is None or not is_lineage_best(saved.get("trainer_state", {}), state):
            return False
        checkpoint.load_into(best, model) if sharded else model.load_state_dict(saved["model"])  # sharded: every rank
        return True


def hard_link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def is_lineage_best(saved: dict[str, Any], state: TrainerState) -> bool:
    """Whether a checkpoint's trainer_state is this lineage's best (or, without validation, latest)."""
    step = state.best_step if state.best_step is not None else state.global_step
    return saved.get("lineage", "") == state.lineage and saved.get("global_step") == step
