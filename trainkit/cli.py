"""The command line: ``trainkit train|validate|eval|translate|export``, thin over the library.

``train`` is a full Hydra app (overrides, ``-m``, ``--cfg``, ``--help``, ``--config-dir``,
sweeper and launcher plugins). Errors a user can cause end with one message naming the
key, file or line and exit code 2 (a traceback only with ``HYDRA_FULL_ERROR=1``); a
stop on SIGTERM/SIGUSR1 exits 75. ``--version`` and ``--help`` never import torch.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

from trainkit.__about__ import __version__
from trainkit.commands.failures import explain
from trainkit.core.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, TrainkitError, did_you_mean

USAGE = """\
usage: trainkit COMMAND [ARGS]

commands:
  train      [overrides]            train from conf/ (a Hydra app: -m, --cfg job, --help, --config-dir)
  validate   [overrides]            compose and build everything, train nothing, report every problem
  eval       ckpt=PATH [split=val|test] [device=cpu] [data.KEY=VALUE]   evaluate a checkpoint with its own config
  translate  ckpt=PATH [input=FILE] [beam=4] [batch_size=64] [max_len=...]   stdin -> stdout
  export     ckpt=PATH format=safetensors|torchscript|onnx|merged [out=PATH]   the model outside trainkit
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
CONFIG_MODULE = "trainkit.conf"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else EXIT_USAGE)
    if argv[0] in ("-V", "--version"):
        print(f"trainkit {__version__}")
        return
    commands: dict[str, Callable[[list[str]], int]] = {
        "train": run_train, "validate": run_validate, "eval": run_eval, "translate": run_translate,
        "export": run_export, "report": run_report,
    }
    command = commands.get(argv[0])
    if command is None:
        fail(f"unknown command {argv[0]!r}{did_you_mean(argv[0], commands)} (commands: {', '.join(commands)})")
    if argv[0] == "train":
        from trainkit.core import stop

        stop.install()  # from now on SIGTERM/SIGUSR1 end the run at its next safe point with exit 75
    sys.exit(guarded(lambda: command(argv[1:])))


def fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"trainkit: error: {message}", file=sys.stderr)
    sys.exit(code)


def guarded(run: Callable[[], int | None]) -> int:
    """Run a command; turn the errors a user can cause into one message and an exit code."""
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra re-raises instead of printing when HYDRA_FULL_ERROR is set: trainkit then decides
    # how an error reads and which exit code it gets.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        return run() or 0
    except KeyboardInterrupt:
        print("trainkit: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the one place every failure is reported
        code, message = explain(error)
        if show_traceback or code == EXIT_FAILED and not isinstance(error, TrainkitError):
            traceback.print_exc()
        print(f"trainkit: error: {message}", file=sys.stderr)
        return code
    finally:
        if not show_traceback:
            os.environ.pop("HYDRA_FULL_ERROR", None)



# train ------------------------------------------------------------------------------------------
def run_train(args: list[str]) -> int:
    import hydra

    from trainkit.core.schema import register_schema

    register_schema()

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")
    def train(cfg) -> float | None:
        from trainkit.commands.sweep import run_job
        from trainkit.run.train import train_model

        # The monitored metric, the objective a sweeper optimises; a multirun job that fails
        # is recorded in the sweep's summary and returns None instead of ending the sweep.
        return run_job(cfg, train_model)

    from trainkit.core import ranks
    from trainkit.engine import launcher

    if ranks.under_torchrun():  # every rank runs this app: agree on one run directory
        ranks.agree_on_start_time()
        args = [*args, *launcher.worker_overrides()]
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if restarted and not any(a.startswith("resume=") for a in args):
            args.append("resume=auto")  # torchrun --max-restarts: continue from the last checkpoint
    saved_argv = sys.argv
    sys.argv = ["trainkit train", *args]
    try:
        train()
    finally:
        sys.argv = saved_argv
    return 0


# validate ---------------------------------------------------------------------------------------
def compose(overrides: list[str], config_dir: str | None = None):
    """The config ``trainkit train`` would run with these overrides (no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from trainkit.core.schema import register_schema

    register_schema()
    if config_dir:
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"]
    with initialize_config_module(version_base="1.3", config_module=CONFIG_MODULE):
        return hydra_compose(config_name="config", overrides=overrides)


def run_validate(args: list[str]) -> int:
    from trainkit.run.build import validate

    config_dir = None
    if "--config-dir" in args:
        index = args.index("--config-dir")
        config_dir = args[index + 1] if index + 1 < len(args) else None
        args = args[:index] + args[index + 2:]
    cfg = compose(args, config_dir)
    problems = validate(cfg)
    if problems:
        print(f"trainkit validate: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"- {problem}", file=sys.stderr)
        return EXIT_USAGE
    print(f"trainkit validate: OK (model {cfg.model._target_}, data {cfg.data._target_}, "
          f"task {cfg.task._target_}, optimizer {cfg.optimizer._target_})")
    return 0


# eval and translate -----------------------------------------------------------------------------
def parse_pairs(args: list[str], allowed: dict[str, str], command: str,
                prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """key=value arguments of eval/translate/export, with a suggestion for a misspelled key;
    keys starting with one of ``prefixes`` (``data.``) pass as they are."""
    values = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{command}: expected key=value, got {arg!r} (keys: {', '.join(allowed)})")
        if key not in allowed and not any(key.startswith(p) and len(key) > len(p) for p in prefixes):
            raise ConfigError(f"{command}: unknown key {key!r}{did_you_mean(key, allowed)} (keys: {', '.join(allowed)})")
        values[key] = value
    return values


TRUST_HELP = "module prefixes the checkpoint's stored config may build, e.g. trust=[mypkg]"


def log_to_stderr() -> None:
    """eval, translate and export say on stderr what they read (their results go to stdout)."""
    import logging

    logger = logging.getLogger("trainkit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("trainkit: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run_eval(args: list[str]) -> int:
    from trainkit.commands.inference import evaluate_checkpoint
    from trainkit.core.builder import parse_trust

    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "checkpoint path", "split": "val|test", "device": "cpu|cuda|auto",
                                 "batch_size": "override", "trust": TRUST_HELP}, "eval", ("data.",))
    if "ckpt" not in options:
        raise ConfigError("eval: ckpt=PATH is required (for example ckpt=outputs/<name>/<time>/checkpoints/best.pt)")
    try:
        batch_size = int(options["batch_size"]) if "batch_size" in options else None
    except ValueError:
        raise ConfigError(f"eval: batch_size={options['batch_size']!r} must be a whole number") from None
    data = {key: value for key, value in options.items() if key.startswith("data.")}
    evaluate_checkpoint(options["ckpt"], options.get("split", "test"), options.get("device", "cpu"), batch_size,
                        parse_trust(options.get("trust")), data)
    return 0


def run_translate(args: list[str]) -> int:
    from trainkit.commands.inference import translate_stream
    from trainkit.core.builder import parse_trust

    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "", "input": "", "beam": "", "batch_size": "", "max_len": "",
                                 "device": "", "length_penalty": "", "trust": TRUST_HELP}, "translate")
    if "ckpt" not in options:
        raise ConfigError("translate: ckpt=PATH is required")
    try:
        beam = int(options.get("beam", 4))
        batch_size = int(options.get("batch_size", 64))
        max_len = int(options["max_len"]) if "max_len" in options else None
        length_penalty = float(options.get("length_penalty", 1.0))
    except ValueError as error:
        raise ConfigError(f"translate: {error}") from None
    if beam < 1 or batch_size < 1:
        raise ConfigError("translate: beam and batch_size must be at least 1")
    translate_stream(options["ckpt"], options.get("input"), beam, batch_size, max_len,
                     length_penalty, options.get("device", "cpu"), trust=parse_trust(options.get("trust")))
    return 0


# export -----------------------------------------------------------------------------------------
def run_export(args: list[str]) -> int:
    from trainkit.commands.export import EXTENSIONS, export_checkpoint
    from trainkit.core.builder import parse_trust

    log_to_stderr()
    options = parse_pairs(args, {"ckpt": "checkpoint path", "format": "|".join(EXTENSIONS),
                                 "out": "output path", "trust": TRUST_HELP}, "export")
    if "ckpt" not in options or "format" not in options:
        raise ConfigError(f"export: ckpt=PATH and format={'|'.join(EXTENSIONS)} are required")
    for path in export_checkpoint(options["ckpt"], options["format"], options.get("out"),
                                  parse_trust(options.get("trust"))):
        print(f"wrote {path}")
    return 0


# report -----------------------------------------------------------------------------------------
def run_report(args: list[str]) -> int:
    from trainkit.commands.report import report

    if not args or "=" in args[0]:
        raise ConfigError("report: give a sweep or run directory: trainkit report DIR [out=FILE.png]")
    options = parse_pairs(args[1:], {"out": "picture path"}, "report")
    report(args[0], options.get("out"))
    return 0
