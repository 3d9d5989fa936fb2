"""The launcher of worker processes: ``distributed.nproc_per_node=N`` starts N ranks on this
machine, each running the training function it is given (``run.train.train_model``).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import torch

from trainkit.core import stop
from trainkit.core.errors import EXIT_PREEMPTED

STOP_SIGNAL_ENV = "TRAINKIT_STOP_SIGNAL"  # a stop request the parent received before a worker could be told
AGENT_SIGNALS = ("SIGINT", "SIGHUP", "SIGQUIT")  # torch elastic's agent still handles these itself


def worker_overrides() -> list[str]:
    """Hydra overrides for torchrun ranks other than 0: no .hydra/ record, no log file."""
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(train: Callable[..., Any], config_yaml: str, run_dir: str, nproc_per_node: int) -> dict[str, Any]:
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
            results = elastic_launch(config, worker)(train, config_yaml, run_dir)
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


def worker(train: Callable[..., Any], config_yaml: str, run_dir: str) -> dict[str, Any]:
    """One self-launched rank: train from the parent's resolved config, into its run directory.
    Errors a user caused come back as values (the parent maps them to exit codes)."""
    from omegaconf import OmegaConf

    from trainkit.core.errors import TrainkitError

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
        result = train(OmegaConf.create(config_yaml), run_dir=run_dir)
    except TrainkitError as error:
        return {"error": type(error).__name__, "exit_code": error.exit_code, "message": str(error)}
    return result.__dict__ | {"history": result.history}
