"""The benchmark scripts run (they are benchmarks, not tests: only that they work is checked
here, on a few steps; their figures are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).parents[1] / "scripts"


def run_script(*args: str, cwd: Path) -> list[dict]:
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=subprocess_env({"PYTHONWARNINGS": "ignore"}),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_loop_compares_the_contenders_in_both_modes(tmp_path):
    rows = run_script(str(SCRIPTS / "bench_loop.py"), "--rounds", "1", "--cases", "mlp", "--steps", "40",
                      "--json", str(tmp_path / "loop.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "loop.json").read_text())
    assert [next(iter(row)) for row in rows] == list(results) == ["mlp separate", "mlp interleaved"]
    separate, interleaved = results["mlp separate"], results["mlp interleaved"]
    assert separate["raw_ms"] > 0 and separate["trainkit_ms"] > 0
    assert separate["trainkit/raw"] == pytest.approx(separate["trainkit_ms"] / separate["raw_ms"])
    assert interleaved["raw_vs_twin"] > 0 and interleaved["trainkit_vs_twin"] > 0
    assert interleaved["trainkit/raw"] == pytest.approx(interleaved["trainkit_vs_twin"] / interleaved["raw_vs_twin"])
    # --tracking's contender, one worker (MLflow's import and SQLite tables are most of its ~7 s):
    # it fails unless its MLflow run started and every batch of metrics was sent without error.
    tracked = run_script(str(SCRIPTS / "bench_loop.py"), "--worker", "trainkit+mlflow+csv", "mlp", "30", "--twin",
                         cwd=tmp_path)[-1]
    assert tracked["steps"] == 9 and tracked["ratio_to_twin"] > 0 and tracked["window_mean_diff_to_twin_s"] != 0


def test_bench_perf_quick_run(tmp_path):
    rows = run_script(str(SCRIPTS / "bench_perf.py"), "--quick", "startup", "padding", "decoding", cwd=tmp_path)
    results = {name: values for row in rows for name, values in row.items()}
    assert results["startup"]["first_step_s"] > results["startup"]["import_torch_s"] > 0
    assert 0 <= results["padding"]["bucketed_padding"] < results["padding"]["naive_padding"] < 1
    assert results["padding"]["bucketed_tokens_per_s"] > 0 and results["padding"]["naive_tokens_per_s"] > 0
    assert results["decoding"]["greedy_speedup"] > 1  # incremental decoding is faster even on one repeat


def test_bench_fsdp_quick_run_shards_model_state(tmp_path):
    rows = run_script(str(SCRIPTS / "bench_fsdp.py"), "--quick", "--steps", "2", cwd=tmp_path)
    results = {(row["strategy"], row["ranks"]): row for row in rows}
    ddp, fsdp = results["ddp", 2], results["fsdp", 2]
    assert ddp["params_total"] == fsdp["params_total"] > 0
    assert ddp["grad_mib"] == ddp["param_mib"] > 0 and ddp["optimizer_mib"] == pytest.approx(2 * ddp["param_mib"], rel=1e-3)
    assert fsdp["model_state_mib"] < ddp["model_state_mib"]
    assert fsdp["ratio"] == pytest.approx(0.5, abs=0.01) and fsdp["goal_met"]
    assert fsdp["peak_rss_end_mib"] >= fsdp["peak_rss_step_mib"] > 0


def test_bench_gpu_step_runs_its_cpu_smoke_mode(tmp_path):
    """The GPU step-time bench (scripts/gpu_check.sh runs it on a GPU) at tiny sizes on the CPU:
    both contenders ran and the ratio is theirs."""
    (row,) = run_script(str(SCRIPTS / "bench_gpu_step.py"), "--cpu", "--precision", "fp32", "--windows", "1",
                        "--steps", "2", cwd=tmp_path)
    assert row["device"] == "cpu" and row["parameters"] > 0
    assert row["ratio"] == pytest.approx(row["trainkit_ms_per_step"] / row["raw_ms_per_step"], rel=1e-2)
