"""``trainkit validate [--config-dir DIR] [overrides]``: compose and build everything a run
would, train nothing, and report every problem at once (exit 2) or one OK line (exit 0)."""

from __future__ import annotations

import sys

from trainkit.commands.config import compose
from trainkit.core.errors import EXIT_USAGE


def run_validate(args: list[str]) -> int:
    """Validate the config these arguments compose; problems go to stderr, one per line."""
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
