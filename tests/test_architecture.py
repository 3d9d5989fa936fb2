"""The package's shape is checked, not just described: imports only go down the layers and
form no cycle (import-linter, configured in pyproject.toml's ``[tool.importlinter]``), and
no function is over 60 lines, no class over 200.

The import checks run ``lint-imports`` the way CI does, on the repository and on a copy of
the package with one upward import or one cycle added, so a checker that silently passes
everything (a wrong config, the installed package analysed instead of the copy) fails here.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "trainkit"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 200


def importlinter_config() -> str:
    """pyproject.toml's ``[tool.importlinter]`` section and its contracts, as TOML text."""
    kept, inside = [], False
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        if line.startswith("["):
            inside = line.strip("[] ").startswith("tool.importlinter")
        if inside:
            kept.append(line)
    return "\n".join(kept) + "\n"


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` in ``folder`` with ``folder`` first on the path, so the ``trainkit``
    it analyses is the one in ``folder`` (not the installed package); no cache is written."""
    script = Path(sys.executable).with_name("lint-imports")
    command = str(script) if script.exists() else shutil.which("lint-imports")
    assert command, "lint-imports not found: pip install -e '.[dev]' (import-linter)"
    return subprocess.run([command, "--no-cache", "--no-logo"], cwd=folder, text=True, capture_output=True,
                          env=subprocess_env({"PYTHONPATH": str(folder)}), timeout=300)


def contract_names() -> dict[str, str]:
    """Contract type (``layers``, ``acyclic_siblings``, ...) -> the contract's name."""
    names = {}
    for block in importlinter_config().split("[[tool.importlinter.contracts]]")[1:]:
        kind = re.search(r'^type = "(.*)"$', block, flags=re.MULTILINE)
        name = re.search(r'^name = "(.*)"$', block, flags=re.MULTILINE)
        assert kind and name, f"a contract without a type or name in pyproject.toml:\n{block}"
        names[kind.group(1)] = name.group(1)
    return names


def layers_and_acyclic() -> tuple[str, str]:
    """The names of the layers contract and the contract against import cycles."""
    names = contract_names()
    acyclic = [name for kind, name in names.items() if kind.startswith("acyclic")]
    assert "layers" in names and len(acyclic) == 1, f"expected a layers and an acyclic contract, got {names}"
    return names["layers"], acyclic[0]


def copy_of_package(tmp_path: Path) -> Path:
    """The package and the import-linter config in ``tmp_path``, to break on purpose."""
    shutil.copytree(PACKAGE, tmp_path / "trainkit", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pyproject.toml").write_text(importlinter_config())
    return tmp_path


def add_lazy_import(module: Path, target: str) -> None:
    """Append a function that imports ``target`` (imports inside functions count too)."""
    with module.open("a") as file:
        file.write(f"\n\ndef _added_by_test() -> None:\n    import {target}  # noqa: F401\n")


def test_the_repository_keeps_both_import_contracts() -> None:
    names = layers_and_acyclic()
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in names:
        assert f"{name} KEPT" in output, output


def test_an_upward_import_fails_naming_the_import(tmp_path: Path) -> None:
    copy = copy_of_package(tmp_path)
    add_lazy_import(copy / "trainkit/core/errors.py", "trainkit.run.train")
    result = lint_imports(copy)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{layers_and_acyclic()[0]} BROKEN" in output, output
    assert "trainkit.core.errors -> trainkit.run.train" in output, output


def test_a_cycle_between_siblings_fails_the_acyclic_contract(tmp_path: Path) -> None:
    # core.schema imports core.errors; core.errors importing core.schema closes a cycle that
    # stays inside one layer, so only the acyclic contract can catch it.
    copy = copy_of_package(tmp_path)
    add_lazy_import(copy / "trainkit/core/errors.py", "trainkit.core.schema")
    result = lint_imports(copy)
    output = result.stdout + result.stderr
    layers, acyclic = layers_and_acyclic()
    assert result.returncode != 0, output
    assert f"{layers} KEPT" in output and f"{acyclic} BROKEN" in output, output
    assert "No cycles are allowed in trainkit.core" in output, output
    assert re.search(r"\.schema -> \.errors|\.errors -> \.schema", output), output


def oversized(source: str) -> list[tuple[int, str, int, int]]:
    """(first line, name, lines, limit) of every function over 60 lines and class over 200,
    counted from the first decorator to the last line, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            lines = node.end_lineno - first + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines > limit:
                found.append((first, node.name, lines, limit))
    return found


def test_the_size_scan_counts_from_the_decorator() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(58))
    at_limit = f"@staticmethod\ndef f():\n{body}\n"  # 60 lines with its decorator
    assert oversized(at_limit) == []
    assert oversized(f"@staticmethod\n{at_limit}") == [(1, "f", 61, MAX_FUNCTION_LINES)]


def test_no_function_over_60_lines_and_no_class_over_200() -> None:
    problems = [
        f"{path.relative_to(ROOT)}:{line}: {name} is {lines} lines (limit {limit})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name, lines, limit in oversized(path.read_text())
    ]
    assert not problems, "split these:\n" + "\n".join(problems)
