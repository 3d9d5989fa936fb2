"""The ``key=value`` arguments of ``trainkit eval|translate|export|report``, and the stderr
logging those commands share: what they read goes to stderr, their results to stdout.

Nothing here imports torch: a typo in an argument is reported before anything heavy loads.
"""

from __future__ import annotations

import logging
import sys

from trainkit.core.errors import ConfigError, did_you_mean

TRUST_HELP = "module prefixes the checkpoint's stored config may build, e.g. trust=[mypkg]"


def parse_pairs(args: list[str], allowed: dict[str, str], command: str,
                prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """key=value arguments of eval/translate/export/report, with a suggestion for a misspelled
    key; keys starting with one of ``prefixes`` (``data.``) pass as they are. Raises
    ``ConfigError`` naming ``command`` and the valid keys."""
    values = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{command}: expected key=value, got {arg!r} (keys: {', '.join(allowed)})")
        if key not in allowed and not any(key.startswith(p) and len(key) > len(p) for p in prefixes):
            raise ConfigError(f"{command}: unknown key {key!r}{did_you_mean(key, allowed)} (keys: {', '.join(allowed)})")
        values[key] = value
    return values


def log_to_stderr() -> None:
    """eval, translate and export say on stderr what they read (their results go to stdout)."""
    logger = logging.getLogger("trainkit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("trainkit: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
