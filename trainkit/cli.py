"""The command line: ``trainkit train|validate|eval|translate|export|report``.

This module only parses: it answers ``--help`` and ``--version``, picks the command named by
the first argument and runs it under the one error handler
(:func:`trainkit.commands.failures.guarded`). Each command lives in ``trainkit.commands``
and is imported only when it runs, so ``--version``, ``--help`` and a mistyped command never
import torch. Errors a user can cause end with one message naming the key, file or line and
exit code 2 (a traceback only with ``HYDRA_FULL_ERROR=1``); a stop on SIGTERM/SIGUSR1 exits
75. ``compose`` (the config ``trainkit train`` would run) is re-exported for tests and users.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from trainkit.__about__ import __version__
from trainkit.commands.config import compose
from trainkit.commands.failures import guarded
from trainkit.core import stop
from trainkit.core.errors import EXIT_USAGE, did_you_mean

__all__ = ["COMMANDS", "USAGE", "compose", "main"]

USAGE = """\
usage: trainkit COMMAND [ARGS]

commands:
  train      [overrides]            train from conf/ (a Hydra app: -m, --cfg job, --help, --config-dir)
  validate   [overrides]            compose and build everything, train nothing, report every problem
  eval       ckpt=PATH [split=val|test] [device=cpu] [data.KEY=VALUE]   evaluate a checkpoint with its own config
  translate  ckpt=PATH [input=FILE] [beam=4] [batch_size=64] [max_len=...]   stdin -> stdout
  export     ckpt=PATH format=safetensors|torchscript|onnx|merged|hf|pt [out=PATH]   the model outside trainkit
             (eval, translate, export: trust=[mypkg] lets the checkpoint's stored config build mypkg's targets)
  report     DIR [out=FILE.png]     a sweep's summary table (or a run's result) and a picture of its curves

examples:
  trainkit train +experiment=nmt_base
  trainkit train +experiment=digits_mlp optimizer.lr=1e-3 trainer.max_epochs=3
  trainkit train -m +experiment=digits_mlp optimizer.lr=1e-3,3e-3 scheduler=cosine,none
  trainkit eval ckpt=outputs/digits_mlp/<time>/checkpoints/best.pt split=test

options:
  -h, --help     this text (trainkit train --help shows the config groups)
  -V, --version  print the version
"""

COMMANDS = ("train", "validate", "eval", "translate", "export", "report")


def main(argv: Sequence[str] | None = None) -> None:
    """``trainkit ARGS``: run one command and exit with its code (``argv`` defaults to sys.argv)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else EXIT_USAGE)
    if argv[0] in ("-V", "--version"):
        print(f"trainkit {__version__}")
        return
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        fail(f"unknown command {name!r}{did_you_mean(name, COMMANDS)} (commands: {', '.join(COMMANDS)})")
    code = guarded(lambda: load(name)(args))
    stop.ignore()  # the work is done: a stop request now must not turn its exit code into a signal death
    sys.exit(code)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print ``trainkit: error: MESSAGE`` on stderr and exit with ``code``."""
    print(f"trainkit: error: {message}", file=sys.stderr)
    sys.exit(code)


def load(name: str) -> Callable[[list[str]], int]:
    """The entry point of command ``name`` (one of COMMANDS), imported only now."""
    if name == "train":
        from trainkit.commands.train import run_train as command
    elif name == "validate":
        from trainkit.commands.validate import run_validate as command
    elif name == "eval":
        from trainkit.commands.inference import run_eval as command
    elif name == "translate":
        from trainkit.commands.inference import run_translate as command
    elif name == "export":
        from trainkit.commands.export import run_export as command
    else:
        from trainkit.commands.report import run_report as command
    return command
