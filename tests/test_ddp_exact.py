"""Exactness and liveness under DDP: every rank joins every collective, each rank has its own seed
and draws its own randomness, a 2-rank run resumes bitwise, a user's DistributedSampler is
reshuffled each epoch, and SIGTERM to a self-launched job's parent stops it like torchrun's
workers (exit 75)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import suppress

import pytest
import torch
from conftest import Cli, assert_same_weights, load_weights
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from trainkit import Trainer
from trainkit.core.seeding import rank_seed

QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]


def start(cli: Cli, *args: str, **extra_env: str) -> subprocess.Popen:
    """``python -m trainkit train ...`` in a process group of its own, so that a failed test
    can end every worker too (``kill_group``)."""
    return cli.start("train", *args, *QUIET, env=extra_env, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.ddp
@pytest.mark.slow
def test_contrastive_validation_with_a_rank_that_has_no_batch(cli, tmp_path):
    # 269 validation images in batches of 256 over 3 ranks: rank 2 gets no batch (it must
    # still join the gather), rank 1 gets the second one (its views must not depend on that).
    job = start(cli, "+experiment=digits_contrastive", "distributed.nproc_per_node=3", "trainer.max_steps=1",
                "scheduler=none", "hydra.run.dir=outputs/ddp")
    try:
        _, stderr = job.communicate(timeout=120)  # a rank left out of a collective: the job hangs
    finally:
        kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    final = json.loads((tmp_path / "outputs/ddp/result.json").read_text())["final"]
    single = cli("eval", f"ckpt={tmp_path / 'outputs/ddp/checkpoints/last.pt'}", "split=val")
    assert single.returncode == 0, single.stderr[-3000:]
    one_process = json.loads(single.stdout)
    assert set(one_process) == {"val/loss", "val/recall_at_1"}
    for key, value in one_process.items():
        assert final[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_each_rank_gets_its_own_seed_and_rank_zero_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(8)}
    assert len(seeds) == 8 and rank_seed(7, 3) == rank_seed(7, 3) and rank_seed(8, 3) != rank_seed(7, 3)

@pytest.mark.ddp
@pytest.mark.slow
def test_two_rank_resume_is_bitwise_with_dropout_and_ranks_draw_their_own_masks(cli, tmp_path):
    # 2 ranks x 64 images: 10 steps an epoch, rank 1 takes the short last batch (43 images), so
    # its RNG moves differently from rank 0's; the stop at step 12 is in the middle of epoch 2.
    common = ["+experiment=digits_mlp", "model.dropout=0.2", "trainer.max_steps=14", "scheduler.warmup_steps=2",
              "distributed.nproc_per_node=2",
              *QUIET]
    folder = tmp_path / "rng"
    folder.mkdir()
    out = cli("train", *common, "hydra.run.dir=outputs/whole/run",
              f"+callbacks.rng={{_target_: probe_helpers.RecordRngState, step: 1, folder: {folder}}}")
    assert out.returncode == 0, out.stderr[-3000:]
    rank0, rank1 = (folder / "rank0").read_text(), (folder / "rank1").read_text()
    assert rank0 != rank1, "both ranks hold the same RNG state: they draw the same dropout masks"
    out = cli("train", *common, "hydra.run.dir=outputs/parts/first",
              "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 12}")
    assert out.returncode == 75, out.stderr[-3000:]
    stopped = torch.load(tmp_path / "outputs/parts/first/checkpoints/last.pt", weights_only=True)
    assert stopped["trainer_state"]["global_step"] == 12 and stopped["trainer_state"]["batch_in_epoch"] == 2
    assert len(stopped["rng_ranks"]) == 2
    assert not torch.equal(stopped["rng_ranks"][0]["torch"], stopped["rng_ranks"][1]["torch"])
    out = cli("train", *common, "hydra.run.dir=outputs/parts/second", "resume=auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/whole/run/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/parts/second/checkpoints/last.pt"))


@pytest.mark.ddp
@pytest.mark.slow
def test_sigterm_to_the_self_launch_parent_stops_with_a_resumable_checkpoint(cli, tmp_path):
    run = tmp_path / "outputs/digits_mlp/first"
    parent = start(cli, "+experiment=digits_mlp", "distributed.nproc_per_node=2", "trainer.max_epochs=1000",
                   "trainer.log_every_n_steps=2", f"hydra.run.dir={run}")
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or "train/loss" not in (run / "metrics.jsonl").read_text():
            assert parent.poll() is None and time.monotonic() < deadline, "no training step was logged"
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)  # the parent alone, as a scheduler or `kill PID` does
        _, stderr = parent.communicate(timeout=60)
    finally:
        kill_group(parent)
    assert parent.returncode == 75, stderr[-3000:]
    state = torch.load(run / "checkpoints/last.pt", weights_only=True)["trainer_state"]
    step = state["global_step"]
    assert step >= 2 and state["world_size"] == 2
    out = cli("train", "+experiment=digits_mlp", "distributed.nproc_per_node=2", "resume=auto",
              f"trainer.max_steps={step + 2}", "scheduler=none", "hydra.run.dir=outputs/digits_mlp/second", *QUIET)
    assert out.returncode == 0, out.stderr[-3000:]
    second = tmp_path / "outputs/digits_mlp/second"
    assert json.loads((second / "result.json").read_text())["global_step"] == step + 2
    assert f"step {step} " in (second / "train.log").read_text()  # "resumed from ... at epoch E, step S (batch B ...)"


@pytest.mark.ddp
@pytest.mark.slow
def test_a_second_sigterm_ends_a_stuck_self_launched_job(cli, tmp_path):
    stamp = tmp_path / "stuck"
    parent = start(cli, "+experiment=digits_mlp", "distributed.nproc_per_node=2",
                   f"+callbacks.hang={{_target_: fault_helpers.HangAtStep, rank: 1, step: 2, stamp: {stamp}}}",
                   TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2")
    try:
        deadline = time.monotonic() + 120
        while not stamp.exists():
            assert parent.poll() is None and time.monotonic() < deadline, "the job did not reach the stuck step"
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)
        time.sleep(3)
        assert parent.poll() is None  # the request waits for the step, which never ends
        parent.send_signal(signal.SIGTERM)
        _, stderr = parent.communicate(timeout=60)  # the agent: SIGTERM, SIGKILL after 2 s
    finally:
        kill_group(parent)
    assert parent.returncode not in (0, 75), stderr[-3000:]
    assert "SIGTERM again" in stderr


class RecordingDataset(Dataset):
    """``n`` samples whose every access is recorded (a single-process loader)."""

    def __init__(self, n: int):
        self.inputs, self.targets = torch.randn(n, 3), torch.randint(0, 2, (n,))
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        self.seen.append(index)
        return self.inputs[index], self.targets[index]


def test_a_users_distributed_sampler_is_reshuffled_every_epoch():
    dataset = RecordingDataset(24)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    model = nn.Linear(3, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=3)
    trainer.fit(loader)
    orders = [dataset.seen[24 * epoch: 24 * (epoch + 1)] for epoch in range(3)]
    assert len(dataset.seen) == 72 and orders[0] != orders[1] != orders[2]
    for epoch, order in enumerate(orders):
        reference = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        reference.set_epoch(epoch)
        assert order == list(reference), f"epoch {epoch}"
