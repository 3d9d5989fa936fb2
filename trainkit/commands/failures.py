"""One exit code and one message for whatever stopped a command: a config error, a bad
file, a missing plugin, a stop request, or a bug (with its traceback).

:func:`guarded` is the one place a command's failure is reported; :func:`explain` says what
the failure means. Nothing here imports torch.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable

from trainkit.core.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, TrainkitError, did_you_mean


def guarded(run: Callable[[], int | None]) -> int:
    """Run a command; turn the errors a user can cause into one message on stderr and an exit
    code (2 for usage, 75 for a stop request, 130 for Ctrl-C). A bug also prints its
    traceback; ``HYDRA_FULL_ERROR=1`` prints the traceback of every error."""
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


def explain(error: BaseException) -> tuple[int, str]:
    """(exit code, one message) for an exception from composing, building or training."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, TrainkitError):
        return error.exit_code, str(error)

    plugin_hint = missing_plugin(error)
    if plugin_hint is not None:
        return EXIT_USAGE, plugin_hint
    chain = causes(error)
    key_error = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if key_error is not None:
        return EXIT_USAGE, explain_key_error(error, key_error)
    yaml_error = next((e for e in chain if type(e).__module__.startswith("yaml")), None)
    if yaml_error is not None:
        return EXIT_USAGE, "invalid YAML: " + " ".join(str(yaml_error).split())
    os_error = next((e for e in chain if isinstance(e, OSError) and e.filename), None)
    if os_error is not None:
        return EXIT_USAGE, f"cannot use {os_error.filename}: {os_error.strerror or os_error}"
    if any(isinstance(e, (HydraException, OmegaConfBaseException)) for e in chain):
        text = str(error).split("Config search path")[0]
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        return EXIT_USAGE, " ".join(lines[:12])
    return EXIT_FAILED, f"{type(error).__name__}: {error}"


def causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def explain_key_error(error: BaseException, key_error: BaseException) -> str:
    """Name the full key, the file it came from, and the closest valid key: from the schema,
    or from the signature of the group's ``_target_``."""
    from trainkit.core.builder import accepted, resolve_target
    from trainkit.core.schema import schema_keys

    full_key = key_error.full_key
    parent, _, key = full_key.rpartition(".")
    source = re.search(r"In '([^']+)'", str(error))
    where = f" (in {source.group(1)}.yaml)" if source and source.group(1) != "config" else ""
    valid = schema_keys(parent)
    node = getattr(key_error, "parent_node", None)
    if valid is None and node is not None and "model_type" in node:  # a Hugging Face config (model=hf)
        from trainkit.models.hf import config_keys

        try:
            valid = config_keys(node.get("model_type"))
        except ConfigError:  # transformers is not installed: no list to suggest from
            valid = None
        if valid is not None and key in valid:
            return f"{full_key}: not listed in this config yet; add it with +{full_key}=VALUE{where}"
    if valid is None and node is not None and "_target_" in node:
        try:
            valid = list(accepted(resolve_target(node, parent))[0])
        except Exception:
            valid = None
    if valid is not None and key not in valid:
        hint = did_you_mean(key, valid, f"{parent}." if parent else "")
        return f"unknown key {full_key!r}{hint}{where}"
    reason = str(key_error).split("\n")[0]
    return f"{full_key}: {reason}{where}"


PLUGINS = {
    "hydra/launcher/joblib": "hydra-joblib-launcher",
    "hydra/launcher/submitit_local": "hydra-submitit-launcher",
    "hydra/launcher/submitit_slurm": "hydra-submitit-launcher",
    "hydra/launcher/ray": "hydra-ray-launcher",
    "hydra/launcher/rq": "hydra-rq-launcher",
    "hydra/sweeper/optuna": "hydra-optuna-sweeper",
    "hydra/sweeper/ax": "hydra-ax-sweeper",
    "hydra/sweeper/nevergrad": "hydra-nevergrad-sweeper",
}


IN_SWEEP_EXTRA = ("hydra-joblib-launcher", "hydra-submitit-launcher", "hydra-optuna-sweeper")


def missing_plugin(error: BaseException) -> str | None:
    """A message naming the package to install when a Hydra launcher/sweeper is not found."""
    match = re.search(r"Could not find '(hydra/(?:launcher|sweeper)/\w+)'", str(error))
    package = PLUGINS.get(match.group(1)) if match else None
    if package is None:
        return None
    install = "pip install 'trainkit[sweep]'" if package in IN_SWEEP_EXTRA else f"pip install {package}"
    option = match.group(1).replace("hydra/launcher/", "hydra/launcher=").replace("hydra/sweeper/", "hydra/sweeper=")
    return f"{option} needs the Hydra plugin {package}, which is not installed: {install}"
