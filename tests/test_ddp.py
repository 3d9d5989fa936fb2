"""torch.distributed on CPU (gloo): torchrun, self-launch, equivalence, faults. Marked ``ddp``."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import TORCHRUN, assert_same_weights, load_weights

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def torchrun(*extra: str, nproc: int = 2) -> tuple[str, ...]:
    """The launcher for ``cli(..., launcher=...)``: torchrun with ``nproc`` workers on this host."""
    return (*TORCHRUN, f"--nproc-per-node={nproc}", "--standalone", *extra)


def run_dirs(tmp_path, name):
    return sorted(p for p in (tmp_path / "outputs" / name).iterdir() if p.is_dir())


@pytest.mark.parametrize("experiment", ["digits_mlp", "nmt_tiny"])
def test_torchrun_one_run_dir_and_exact_metrics(cli, tmp_path, experiment):
    # digits: val/loss falls, so with mode=max best.pt (epoch 1) is not last.pt: every rank must
    # test best.pt's weights.
    best_first = ["trainer.monitor=val/loss", "trainer.monitor_mode=max"] if experiment == "digits_mlp" else []
    out = cli("train", f"+experiment={experiment}", "trainer.max_epochs=2", *best_first, launcher=torchrun())
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path, experiment)
    for name in (".hydra", "train.log", "metrics.jsonl", "tb", "result.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name
    assert not list(run.glob("*.log.*")) and len(list((run / ".hydra").iterdir())) == 3
    summary = json.loads((run / "result.json").read_text())
    # The distributed validation equals one process evaluating the same weights.
    single = cli("eval", f"ckpt={run / 'checkpoints/last.pt'}", "split=val")
    assert single.returncode == 0, single.stderr
    for key, value in json.loads(single.stdout).items():
        assert summary["final"][key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
    if best_first:
        steps = [torch.load(run / f"checkpoints/{name}.pt", weights_only=True)["trainer_state"]["global_step"]
                 for name in ("best", "last")]
        assert steps == [summary["global_step"] // 2, summary["global_step"]]  # best after epoch 1 of 2
    tested = cli("eval", f"ckpt={run / 'checkpoints/best.pt'}", "split=test")
    assert tested.returncode == 0, tested.stderr
    for key, value in json.loads(tested.stdout).items():
        assert summary["test"][key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


@pytest.mark.parametrize("batch, accum", [(32, 1), (8, 2)])
def test_two_ranks_equal_one_process_with_double_batch(cli, tmp_path, batch, accum):
    # 20 steps: for (32, 1) the last one is the short end of the epoch (43 samples either way).
    # float64: the runs differ only in summation order, so they agree to ~1e-13, not ~1e-6 (fp32).
    common = ["+experiment=digits_mlp", "data.shuffle=false", "model.dropout=0", "trainer.max_steps=20",
              "scheduler.warmup_steps=5", f"trainer.grad_accum_steps={accum}", "precision=fp64"]
    out = cli("train", *common, f"data.batch_size={batch}", "distributed.nproc_per_node=2", "hydra.run.dir=outputs/ddp")
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("train", *common, f"data.batch_size={2 * batch}", "hydra.run.dir=outputs/single")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/single/checkpoints/last.pt"), atol=1e-10)


def test_self_launch_inside_a_sweep(cli, tmp_path):
    out = cli("train", "-m", "+experiment=digits_mlp", "trainer.max_epochs=2", "distributed.nproc_per_node=2",
              "optimizer.lr=1e-3,3e-3", "hydra.sweep.dir=sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/result.json"))
    assert len(results) == 2
    assert all(json.loads(r.read_text())["global_step"] == 20 for r in results)


def test_two_nodes_on_loopback(cli, tmp_path):
    from trainkit.engine.launcher import free_port

    port = free_port()
    nodes = [
        cli.start("train", "+experiment=digits_mlp", "trainer.max_epochs=2",
                  launcher=(*TORCHRUN, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback"))
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    (run,) = run_dirs(tmp_path, "digits_mlp")
    assert json.loads((run / "result.json").read_text())["global_step"] == 20  # 2 ranks x batch 64


def test_a_failing_rank_ends_the_job_quickly(cli, tmp_path):
    stamp = tmp_path / "failed_at"
    out = cli("train", "+experiment=digits_mlp", "trainer.max_epochs=50",
              f"+callbacks.boom={{_target_: fault_helpers.RaiseOnRank, rank: 1, step: 5, stamp: {stamp}}}",
              launcher=torchrun(), timeout=120)
    ended = time.time()
    assert out.returncode != 0
    assert ended - float(stamp.read_text()) < 30  # from the exception to the end of the whole job
    assert "injected failure" in out.stderr


def test_a_restarted_worker_continues_from_the_last_checkpoint(cli, tmp_path):
    out = cli("train", "+experiment=digits_mlp", "trainer.max_epochs=4",
              "+callbacks.boom={_target_: fault_helpers.RaiseOnRank, rank: 1, step: 25, hard: true}",
              launcher=torchrun("--max-restarts=1"))
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = run_dirs(tmp_path, "digits_mlp")
    assert not (first / "result.json").exists()
    resumed = json.loads((second / "result.json").read_text())
    assert resumed["global_step"] == 40 and "resumed from" in (second / "train.log").read_text()


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(cli, tmp_path):
    out = cli("train", "+experiment=digits_mlp", "distributed.nproc_per_node=2",
              "+callbacks.term={_target_: fault_helpers.SignalAtStep, step: 7, rank: 1}")
    assert out.returncode == 75, out.stderr[-3000:]
    (run,) = run_dirs(tmp_path, "digits_mlp")
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)["trainer_state"]
    assert state["global_step"] == 7 and state["world_size"] == 2
    out = cli("train", "+experiment=digits_mlp", "distributed.nproc_per_node=2", "resume=auto", "trainer.max_epochs=1",
              "scheduler=none")
    assert out.returncode == 0, out.stderr[-3000:]


def test_resume_with_another_world_size_mid_epoch_is_refused(cli, tmp_path):
    out = cli("train", "+experiment=digits_mlp", "distributed.nproc_per_node=2",
              "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 3}")
    assert out.returncode == 75, out.stderr[-3000:]
    out = cli("train", "+experiment=digits_mlp", "resume=auto")
    assert out.returncode == 2 and "distributed.nproc_per_node=2" in out.stderr
    checkpoint = torch.load(run_dirs(tmp_path, "digits_mlp")[0] / "checkpoints/last.pt", weights_only=True)
    assert checkpoint["trainer_state"]["world_size"] == 2
