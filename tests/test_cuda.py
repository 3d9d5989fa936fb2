"""Training on CUDA: the step never waits for the GPU. Batches come from pinned memory and are
copied without blocking, the gradient norm and the non-finite check stay on the device (the
fused optimizer skips a non-finite update on its ``found_inf`` flag) and are read only when the
loop logs or saves. ``torch.cuda.set_sync_debug_mode("error")`` turns any host sync inside the
steps into an error. The CUDA tests skip without a GPU (``scripts/gpu_check.sh`` runs them on
one); what decides the CUDA defaults is checked everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainkit.core.ranks import Dist
from trainkit.run.build import cuda_defaults
from trainkit.run.train import build_trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "trainer.log_every_n_steps=1000",
         "trainer.test_after_fit=false"]


def test_cuda_defaults_pin_batches_and_fuse_the_optimizer_unless_the_config_says_otherwise(compose):
    assert cuda_defaults(compose(["+experiment=digits_mlp"])) == ({"pin_memory": True}, {"fused": True})
    assert cuda_defaults(compose(["+experiment=digits_mlp", "optimizer=sgd"]))[1] == {"fused": True}
    chosen = compose(["+experiment=digits_mlp", "data.pin_memory=false", "+optimizer.fused=false"])
    assert cuda_defaults(chosen) == ({}, {})


def cuda_trainer(compose, tmp_path: Path, *overrides: str):
    cfg = compose([*overrides, "device=cuda", *QUIET])
    trainer, data = build_trainer(cfg, Dist(device=torch.device("cuda", 0)), tmp_path)
    loader = data.loader("train")
    assert loader.pin_memory and trainer.nonfinite.on_device
    batches = iter(loader)
    return trainer, [next(batches) for _ in range(6)]


@needs_cuda
@pytest.mark.parametrize("overrides", [
    ["+experiment=digits_mlp", "precision=fp32"],
    ["+experiment=digits_mlp", "precision=fp16", "trainer.grad_accum_steps=2"],
    ["+experiment=nmt_tiny", "precision=bf16", "trainer.clip_grad_norm=1.0"],
], ids=["mlp-fp32", "mlp-fp16-accumulation", "transformer-bf16-clipped"])
def test_cuda_steps_make_no_host_sync(compose, tmp_path, overrides):
    trainer, batches = cuda_trainer(compose, tmp_path, *overrides)
    accum = trainer.options.grad_accum_steps
    trainer.train_step(batches[:accum])  # the first step creates the optimizer state and the cuBLAS handles
    trainer.after_step(None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(accum, len(batches) - accum + 1, accum):
            trainer.train_step(batches[start:start + accum])
            trainer.after_step(None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer.log_train()  # the read: every step's loss was metered and is finite
    assert trainer.state.global_step == len(batches) // accum and trainer.state.skipped_steps == 0


@needs_cuda
def test_cuda_non_finite_step_is_skipped_on_the_device_and_counted_when_read(compose, tmp_path):
    trainer, batches = cuda_trainer(compose, tmp_path, "+experiment=digits_mlp", "trainer.nan_policy=skip")
    trainer.train_step(batches[:1])
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    inputs, targets = batches[1]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step([(torch.full_like(inputs, float("nan")), targets)])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert trainer.state.skipped_steps == 0  # not read yet
    trainer.nonfinite.settle(trainer.state)
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_skips == 1
    trainer.train_step(batches[2:3])
    trainer.log_train()
    assert trainer.state.consecutive_skips == 0
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
