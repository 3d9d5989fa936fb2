"""``trainkit report DIR``: a sweep's (or one run's) results as a table on stdout and a picture.

The picture (``report.png`` in DIR unless ``out=`` says otherwise) shows the monitored
validation metric against the optimizer step for every job on one chart, and the best value
of each job against every swept parameter. Everything is read from the run directories
(job.json, result.json, metrics.jsonl); nothing is trained or loaded into torch. matplotlib
is imported only here, when a picture is drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainkit.commands.arguments import parse_pairs
from trainkit.commands.sweep import (
    JOB_FILE,
    JobRow,
    collect_rows,
    read_json,
    result_metrics,
    split_override,
    swept_keys,
    to_markdown,
    write_summary,
)
from trainkit.core.errors import ConfigError


def run_report(args: list[str]) -> int:
    """``trainkit report DIR [out=FILE.png]``."""
    if not args or "=" in args[0]:
        raise ConfigError("report: give a sweep or run directory: trainkit report DIR [out=FILE.png]")
    options = parse_pairs(args[1:], {"out": "picture path"}, "report")
    report(args[0], options.get("out"))
    return 0


def report(path: str | Path, out: str | Path | None = None) -> Path:
    """Print the summary table of the sweep (or the result of the run) at ``path`` and
    write the picture; returns the picture's path. A sweep's summary files are rewritten."""
    root = Path(path)
    if (root / JOB_FILE).is_file():  # one job of a sweep
        rows, kind = collect_rows(root), "Run"
    elif (root / "result.json").is_file():
        rows, kind = [single_run_row(root)], "Run"
    else:
        rows, kind = write_summary(root) if root.is_dir() else [], "Sweep"
    if not rows:
        raise ConfigError(f"report: {root} holds neither a sweep (*/job.json) nor a run (result.json)")
    print(to_markdown(rows, root, kind), end="")
    picture = Path(out) if out is not None else root / "report.png"
    title = f"run {root}" if kind == "Run" else f"sweep {root}: {len(rows)} jobs"
    draw(rows, picture, title)
    print(f"\nwrote {picture}")
    return picture


def single_run_row(run_dir: Path) -> JobRow:
    """One run shown as a one-job sweep: its result.json, with the overrides and the monitor's
    mode that Hydra recorded in .hydra/."""
    result = read_json(run_dir / "result.json") or {}
    trainer = (read_yaml(run_dir / ".hydra" / "config.yaml") or {}).get("trainer", {})
    return JobRow(0, read_yaml(run_dir / ".hydra" / "overrides.yaml") or [], "ok", result.get("monitor", "val/loss"),
                  trainer.get("monitor_mode", "min"), result.get("best_metric"), result_metrics(result), run_dir)


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in metrics.jsonl; a resumed job's repeated steps count once
    (the later record wins)."""
    points: dict[int, float] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return [], []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed job
        value = record.get(metric)
        if isinstance(value, (int, float)):
            points[record["step"]] = value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def draw(rows: list[JobRow], picture: Path, title: str) -> None:
    """Validation curves of every job on one chart, then the best metric against each swept
    parameter (numbers on a numeric axis, logarithmic when they span a decade); a job has
    the same colour in every panel."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("report: drawing needs matplotlib: pip install 'trainkit[sweep]'") from None
    monitor = rows[0].monitor
    swept = swept_keys(rows) if len(rows) > 1 else []
    by_job = sorted(rows, key=lambda r: r.job)
    colours = {row.job: f"C{index % 10}" for index, row in enumerate(by_job)}
    figure = Figure(figsize=(5.5 * (1 + len(swept)), 4.2), layout="constrained")
    axes = figure.subplots(1, 1 + len(swept), squeeze=False)[0]
    for row in by_job:
        steps, values = curve(row.run_dir, monitor)
        given = dict(map(split_override, row.overrides))
        label = " ".join(f"{k.rsplit('.', 1)[-1]}={given.get(k, '')}" for k in swept) or row.run_dir.name
        axes[0].plot(steps, values, marker=".", color=colours[row.job], label=f"{row.job}: {label}"[:60])
    axes[0].set(xlabel="optimizer step", ylabel=monitor, title=f"{monitor} during training")
    if len(rows) <= 20:
        axes[0].legend(fontsize="small")
    for axis, key in zip(axes[1:], swept):
        plot_against(axis, by_job, key, colours)
    figure.suptitle(title)
    picture.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(picture, dpi=110)


def plot_against(axis: Any, rows: list[JobRow], key: str, colours: dict[int, str]) -> None:
    """Best metric of each finished job against the value it had for ``key``."""
    done = [r for r in rows if isinstance(r.best_metric, (int, float)) and math.isfinite(r.best_metric)]
    values = [dict(map(split_override, r.overrides)).get(key, "(default)") for r in done]
    numbers = [as_number(v) for v in values]
    if all(n is not None for n in numbers):
        positions = numbers
        if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 10:
            axis.set_xscale("log")
    else:
        categories = sorted(set(values))
        positions = [categories.index(v) for v in values]
        axis.set_xticks(range(len(categories)), categories, rotation=20, fontsize="small")
        axis.set_xlim(-0.5, len(categories) - 0.5)
    axis.scatter(positions, [r.best_metric for r in done], c=[colours[r.job] for r in done])
    axis.set(xlabel=key, ylabel=f"best {rows[0].monitor}", title=f"best {rows[0].monitor} vs {key}")
    axis.grid(alpha=0.3)


def as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
