"""Rank handling, in one place: who this process is, and the few collectives the loop uses.

One process gives ``Dist`` with world size 1, whose collectives return their input and
whose ``no_sync`` does nothing, so the loop reads the same either way. Only the main rank
writes files; ``teardown`` runs in a ``finally``.

Every collective here must be called by every rank, the same number of times and in the
same order, also by a rank that has no data for it (an empty list, a zero count): one rank
that skips a collective leaves the others waiting forever.

Self-launch (``launch``) is torchrun's elastic agent inside this process, with one change:
SIGTERM/SIGUSR1 to this parent are passed on to the workers, which stop like torchrun
workers do (finish the step, write last.pt, exit code 75), instead of the agent killing them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from trainkit import stop
from trainkit.errors import EXIT_PREEMPTED
from trainkit.precision import resolve_device

STOP_SIGNAL_ENV = "TRAINKIT_STOP_SIGNAL"  # a stop request the parent received before a worker could be told
AGENT_SIGNALS = ("SIGINT", "SIGHUP", "SIGQUIT")  # torch elastic's agent still handles these itself


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model under torch.distributed, the model itself otherwise."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, skip_sync: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce on non-final accumulation micro-steps."""
        if self.enabled and skip_sync:
            return model.no_sync()
        return nullcontext()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (exact: sums and counts, never means of means)."""
        if not self.enabled:
            return values
        reduced = values.to(self.comm_device, copy=True)
        torch_dist.all_reduce(reduced)
        return reduced.to(values.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (agree on stopping at one step)."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([float(flag)], device=self.comm_device)).item())

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def teardown(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def under_torchrun() -> bool:
    """True in a worker that torchrun (or trainkit's self-launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend() -> str:
    # gloo for CPU tensors and, on CUDA machines, nccl for CUDA ones: one group serves both.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def setup(device_type: str = "auto", backend: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment, or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_type, local_rank)
    if world_size == 1:
        return Dist(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        init_group(backend)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.ERROR)  # other ranks print nothing but errors
    return Dist(torch_dist.get_rank(), world_size, local_rank, device)


def init_group(backend: str | None = None) -> None:
    """Join torchrun's process group. After ``--max-restarts`` restarts the agent's store
    still holds the dead workers' addresses, so keys get a per-attempt prefix."""
    backend = backend or default_backend()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        torch_dist.init_process_group(backend)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                      world_size, is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = torch_dist.PrefixStore(f"trainkit/attempt_{attempt}", agent_store)
    torch_dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def agree_on_start_time() -> None:
    """Under torchrun, every rank composes the config itself: rank 0's start time, shared
    through the process group, makes ``${trainkit_now:...}`` (the run directory) identical."""
    if not torch_dist.is_initialized():
        init_group()
    stamp = [os.environ.get("TRAINKIT_RUN_TIME") or str(time.time())]
    torch_dist.broadcast_object_list(stamp, src=0)
    os.environ["TRAINKIT_RUN_TIME"] = stamp[0]


def worker_overrides() -> list[str]:
    """Hydra overrides for torchrun ranks other than 0: no .hydra/ record, no log file."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config_yaml: str, run_dir: str, nproc_per_node: int) -> dict[str, Any]:
    """Self-launch: ``nproc_per_node`` workers on this machine with torch's elastic launcher
    (torchrun semantics), each on its share of the cores, on a free port of its own (so
    every job of a sweep is its own process group). Returns rank 0's result.

    A stop request (SIGTERM/SIGUSR1 to this process, or one received before the launch) goes
    on to the workers; they stop after their step with a resumable last.pt and rank 0's
    result says ``Preempted`` (exit code 75). Workers that the request reached while still
    starting (before they could handle it) die of it: that too is reported as ``Preempted``,
    with nothing new saved. A second request while the workers still run (a job stuck
    inside its step) stops them as torchrun's agent does: SIGTERM, then SIGKILL after
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30), and this raises.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    threads = max(1, (os.cpu_count() or 1) // nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=f"trainkit-{os.getpid()}-{time.time_ns()}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        monitor_interval=0.5, start_method="spawn", signals_to_handle=",".join(AGENT_SIGNALS),
    )
    with forward_stop_signals() as received:
        try:
            results = elastic_launch(config, worker)(config_yaml, run_dir)
        except ChildFailedError as error:
            stop_codes = {-getattr(signal, name) for name in stop.SIGNALS}
            if received and all(failure.exitcode in stop_codes for failure in error.failures.values()):
                return {"error": "Preempted", "exit_code": EXIT_PREEMPTED,
                        "message": f"stopped on request ({received[0]}) while the workers were starting; nothing new was saved"}
            raise
    return results[0]


@contextmanager
def forward_stop_signals() -> Iterator[list[str]]:
    """While the workers run, SIGTERM/SIGUSR1 to this process are sent on to every worker
    process (multiprocessing children of this one) and, for workers not started yet, put in
    ``TRAINKIT_STOP_SIGNAL``. Yields the names of the requests received (one taken over from
    ``stop.STOP`` if it was set before). A second signal raises torch elastic's
    ``SignalException``, on which its agent stops the workers itself. Afterwards this
    process's handlers are the previous ones again, also for the signals torch elastic's
    agent takes over (``AGENT_SIGNALS``)."""
    from torch.distributed.elastic.multiprocessing import SignalException

    received: list[str] = [stop.STOP.signal_name or "SIGTERM"] if stop.STOP.requested else []
    stop.STOP.clear()  # handed on to the workers
    if received:
        os.environ[STOP_SIGNAL_ENV] = received[0]
    forwarded = []

    def forward(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if forwarded:
            raise SignalException(f"{name} again after {forwarded[0]}: stopping the workers now", signal.Signals(signum))
        forwarded.append(name)
        received.append(name)
        os.environ[STOP_SIGNAL_ENV] = name
        for child in multiprocessing.active_children():
            with suppress(ProcessLookupError):  # exited since
                os.kill(child.pid, signum)

    names = [name for name in (*stop.SIGNALS, *AGENT_SIGNALS) if hasattr(signal, name)]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names} if main_thread else {}
    for name in stop.SIGNALS if main_thread else ():
        signal.signal(getattr(signal, name), forward)
    try:
        yield received
    finally:
        os.environ.pop(STOP_SIGNAL_ENV, None)
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def worker(config_yaml: str, run_dir: str) -> dict[str, Any]:
    """One self-launched rank: train from the parent's resolved config, into its run directory.
    Errors a user caused come back as values (the parent maps them to exit codes)."""
    from omegaconf import OmegaConf

    from trainkit.errors import TrainkitError
    from trainkit.train import train_model

    stop.install()  # from the first moment: a request the parent passes on must not kill this worker
    if os.environ.get(STOP_SIGNAL_ENV):
        stop.STOP(getattr(signal, os.environ[STOP_SIGNAL_ENV]))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if os.environ.get("RANK") == "0":
        fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        handlers = [logging.StreamHandler(), logging.FileHandler(os.path.join(run_dir, "train.log"))]
        for handler in handlers:
            handler.setFormatter(fmt)
            logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    try:
        result = train_model(OmegaConf.create(config_yaml), run_dir=run_dir)
    except TrainkitError as error:
        return {"error": type(error).__name__, "exit_code": error.exit_code, "message": str(error)}
    return result.__dict__ | {"history": result.history}


def sum_number(dist: Dist, value: float) -> float:
    """A host number summed over ranks (one small all-reduce under DDP, free otherwise)."""
    if not dist.enabled:
        return value
    return float(dist.sum(torch.tensor([float(value)], dtype=torch.float64, device=dist.comm_device)).item())


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over the ranks of the process group, when one is up (for metric
    states held outside a ``Dist``); ``values`` itself when running alone."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return values
    comm_device = values.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(comm_device, copy=True)
    torch_dist.all_reduce(reduced)
    return reduced.to(values.device)


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order (for exact metrics over samples that
    each live on exactly one rank); the list itself when running alone."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return items
    parts: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]
