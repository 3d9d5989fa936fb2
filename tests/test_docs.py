"""Every ``trainkit ...`` command in README.md and docs/*.md works as written, so the docs
cannot drift from the code.

Commands are read from fenced ``bash``/``sh``/``shell``/``console`` blocks (in ``console``
blocks only the ``$ `` lines; other blocks, such as ``text`` transcripts of errors, are not
read). A command may sit in a pipe or an ``&&`` chain, span lines with ``\\``, carry
environment variables (``OMP_NUM_THREADS=1 trainkit ...``) or run as ``python -m trainkit``,
``torchrun ... -m trainkit``. Placeholders in angle brackets (``<time>``) stand for one word.
Paths (``--config-dir``, ``PYTHONPATH``) are relative to the repository root.

- ``train`` and ``validate``: the overrides compose in-process, as ``trainkit train`` composes
  them (``trainkit.cli.compose``), and pass the checks ``trainkit validate`` makes before it
  builds anything: value ranges and every ``_target_`` group's keys against its signature.
  A ``-m`` sweep composes once per swept value (``a=1,2 b=x,y`` composes ``a=1 b=x`` and
  ``a=2 b=y``), with Hydra's own override parser.
- ``eval``, ``translate``, ``export``, ``report``: the command runs in-process with its
  checkpoint (or directory) replaced by a path that does not exist; it must get past its
  argument parsing (subcommand, option names, choices) to the point of reading that path.

A test per command, named by file and line. Composing costs about 0.1-0.2 s a command.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*```\s*([\w-]*)")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w-]*>")  # <time>: in a shell it would be a redirection
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"|", "||", "&&", "&", ";", "(", ")", "$(", "`"}
REDIRECTIONS = {">", ">>", "<", "2>", "&>", "2>&1"}
HYDRA_FLAGS = {"-m", "--multirun", "--resolve", "-h", "--help", "--hydra-help"}
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--config-dir", "-cd", "--package", "-p", "--info", "-i"}


@dataclass(frozen=True)
class Command:
    """One ``trainkit`` invocation found in a doc: where it is, its env and its arguments."""

    where: str  # file:line
    env: dict[str, str]
    args: list[str]


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, logical line) for each command line of the shell blocks in ``path``."""
    lines: list[tuple[int, str]] = []
    language: str | None = None
    pending: tuple[int, str] | None = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if fence:
            language = None if language is not None else fence.group(1) or ""
            continue
        if language not in SHELL_BLOCKS:
            continue
        text = line.strip()
        if pending is None:
            if language == "console":
                if not text.startswith("$ "):
                    continue
            text = text.removeprefix("$ ")
            pending = (number, "")
        start, so_far = pending
        if text.endswith("\\"):
            pending = (start, so_far + text[:-1] + " ")
            continue
        lines.append((start, so_far + text))
        pending = None
    return lines


def words(line: str) -> list[str]:
    """Shell words and operators of one line, comments dropped, placeholders one word."""
    lexer = shlex.shlex(PLACEHOLDER.sub("PLACEHOLDER", line), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def trainkit_invocation(segment: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """(env, args) if a simple command runs trainkit (directly, ``python -m``, ``torchrun -m``)."""
    env = {}
    while segment and ENV_ASSIGNMENT.match(segment[0]):
        name, _, value = segment[0].partition("=")
        env[name] = value
        segment = segment[1:]
    if segment and segment[0] == "trainkit":
        return env, segment[1:]
    for index in range(len(segment) - 1):
        if segment[index] == "-m" and segment[index + 1] == "trainkit":
            return env, segment[index + 2:]
    return None


def commands_in(path: Path) -> list[Command]:
    found = []
    for number, line in shell_lines(path):
        segment: list[str] = []
        tokens = iter([*words(line), ";"])
        for token in tokens:
            if token in REDIRECTIONS:
                next(tokens, None)  # the redirection's target
            elif token in SEPARATORS:
                invocation = trainkit_invocation(segment)
                if invocation is not None and invocation[1] != ["..."]:  # `trainkit ...`: a synopsis
                    found.append(Command(f"{path.relative_to(ROOT)}:{number}", *invocation))
                segment = []
            else:
                segment.append(token)
    return found


COMMANDS = [command for path in DOCS for command in commands_in(path)]


def split_hydra_args(args: list[str]) -> tuple[list[str], set[str], str | None]:
    """(overrides, flags, --config-dir) of a ``trainkit train`` command line."""
    overrides, flags, config_dir = [], set(), None
    rest = iter(args)
    for arg in rest:
        if arg in HYDRA_FLAGS:
            flags.add(arg)
        elif arg in HYDRA_VALUE_FLAGS:
            value = next(rest, None)
            assert value is not None, f"{arg} needs a value"
            if arg in ("--config-dir", "-cd"):
                config_dir = value
        elif arg.startswith("-"):
            pytest.fail(f"trainkit train: unknown flag {arg!r}")
        else:
            overrides.append(arg)
    return overrides, flags, config_dir


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The overrides of a few jobs of a ``-m`` sweep that between them use every swept value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    swept = []  # (key, values) of a sweep override; (None, [override]) of a plain one
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            swept.append((override.get_key_element(), list(override.sweep_string_iterator())))
        else:
            swept.append((None, [override.input_line]))
    jobs = max((len(values) for _, values in swept), default=1)
    return [[values[job % len(values)] if key is None else f"{key}={values[job % len(values)]}"
             for key, values in swept] for job in range(jobs)]


def check_composes(overrides: list[str], config_dir: str | None) -> None:
    """Compose like ``trainkit train`` and run the checks ``trainkit validate`` makes before
    building: value ranges, and each ``_target_`` group's keys against its signature."""
    from omegaconf import DictConfig

    from trainkit.cli import compose
    from trainkit.core.builder import check_node
    from trainkit.core.schema import check_values

    if config_dir is not None:
        assert (ROOT / config_dir).is_dir(), f"--config-dir {config_dir}: no such folder in the repository"
    cfg = compose(overrides, str(ROOT / config_dir) if config_dir else None)
    problems = list(check_values(cfg))
    nodes = {key: cfg[key] for key in cfg if isinstance(cfg[key], DictConfig) and "_target_" in cfg[key]}
    nodes.update({f"callbacks.{name}": node for name, node in (cfg.get("callbacks") or {}).items()})
    for key, node in nodes.items():
        problems.extend(check_node(node, key))
    assert not problems, "; ".join(str(problem) for problem in problems)


def check_train(command: Command) -> None:
    overrides, flags, config_dir = split_hydra_args(command.args[1:])
    if flags & {"-m", "--multirun"}:
        for job in sweep_points(overrides):
            check_composes(job, config_dir)
    else:
        check_composes(overrides, config_dir)


def check_parses(command: Command, missing: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Run a checkpoint command on a missing file: it must fail reading that file, not parsing."""
    from trainkit.cli import main

    args = [f"ckpt={missing}" if arg.startswith("ckpt=") else arg for arg in command.args]
    if args[0] == "report" and len(args) > 1:
        args[1] = str(missing)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and str(missing) in error, (
        f"`trainkit {' '.join(command.args)}` failed before it read its input: {error.strip()}")


def test_the_docs_hold_commands() -> None:
    """The extraction itself works: the front page's commands, a sweep and a torchrun are found."""
    where = {command.where.split(":")[0] for command in COMMANDS}
    assert "README.md" in where
    kinds = {command.args[0] for command in COMMANDS if command.args}
    assert {"train", "eval", "translate", "export", "report", "validate"} <= kinds, kinds
    assert any("-m" in command.args for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where for command in COMMANDS])
def test_doc_command_works(command: Command, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert command.args, "`trainkit` without a command"
    for entry in reversed(command.env.get("PYTHONPATH", "").split(os.pathsep)):
        if entry:
            monkeypatch.syspath_prepend(str(ROOT / entry))
    monkeypatch.chdir(ROOT)
    name = command.args[0]
    if name == "train":
        check_train(command)
    elif name == "validate":
        overrides, _, config_dir = split_hydra_args(command.args[1:])
        check_composes(overrides, config_dir)
    else:
        check_parses(command, tmp_path / "missing" / "best.pt", capsys)


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_doc_links_resolve(path: Path) -> None:
    """Every relative link of a doc names a file that exists (and, with #anchor, a heading in it)."""
    for target, anchor in LINK.findall(path.read_text()):
        if "://" in target:
            continue
        linked = (path.parent / target).resolve()
        assert linked.exists(), f"{path.relative_to(ROOT)}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            headings = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                        for line in linked.read_text().splitlines() if line.startswith("#")}
            assert anchor[1:] in headings, f"{path.relative_to(ROOT)}: link to {target}{anchor}: no such heading"


def test_the_example_package_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/examples (your-own-model.md) builds, as `trainkit validate` would: the model, the
    callback and the self-loss model with task=model_loss."""
    from trainkit.cli import compose
    from trainkit.run.build import validate

    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    monkeypatch.chdir(ROOT)
    config_dir = str(ROOT / "docs" / "examples" / "myconf")
    for overrides in (["+experiment=linear_digits", "+callbacks.count={_target_: mypkg.CountSteps}"],
                      ["+experiment=digits_mlp", "model=self_loss", "task=model_loss", "~loss",
                       "trainer.monitor=val/loss", "trainer.monitor_mode=min"]):
        problems = validate(compose(overrides, config_dir))
        assert not problems, "; ".join(str(problem) for problem in problems)
