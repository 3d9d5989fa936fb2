"""``trainer.compile=true`` for every built-in model, alone and under DDP. Marked ``slow``:
each case compiles (10-60 s on two cores)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model

pytestmark = pytest.mark.slow
STEPS = ["trainer.max_steps=4", "trainer.test_after_fit=false", "logging.progress_bar=false",
         "logging.tensorboard=false"]


@pytest.fixture
def eager_random():
    """Compiled dropout and sampling draw from torch's own generator, as eager ops do, so the
    compiled run sees the eager run's random numbers."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        yield


@pytest.mark.parametrize("experiment, schedule", [("digits_mlp", "scheduler=none"), ("digits_vae", "scheduler=none"),
                                                  ("nmt_tiny", "scheduler.warmup_steps=2")])
def test_compiled_training_matches_eager(compose, tmp_path, eager_random, experiment, schedule):
    from torch._dynamo.utils import counters

    runs = {}
    for mode in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        cfg = compose([f"+experiment={experiment}", *STEPS, schedule, f"trainer.compile={mode}"])
        runs[mode] = train_model(cfg, run_dir=tmp_path / f"compile-{mode}")
        assert bool(counters["stats"]["unique_graphs"]) == (mode == "true")  # compiled only when asked
    assert runs["true"].global_step == runs["false"].global_step == 4
    eager, compiled = (load_weights(tmp_path / f"compile-{m}/checkpoints/last.pt") for m in ("false", "true"))
    assert compiled.keys() == eager.keys()  # the checkpoint holds the model's names, not "_orig_mod."'s
    # Attention's key bias has a zero gradient in exact arithmetic (softmax ignores a shift
    # shared by all keys): what it gets is rounding noise, which Adam scales up to full steps.
    noise = [k for k in eager if k.endswith("k_proj.bias")]
    assert_same_weights(*({k: v for k, v in w.items() if k not in noise} for w in (compiled, eager)), atol=1e-5)
    assert runs["true"].metrics["val/loss"] == pytest.approx(runs["false"].metrics["val/loss"], rel=1e-4)


@pytest.mark.ddp
def test_compiled_ddp_with_accumulation_equals_one_eager_process(cli, tmp_path):
    common = ["+experiment=digits_mlp", "data.shuffle=false", "model.dropout=0", "trainer.max_steps=6",
              "trainer.grad_accum_steps=2", "trainer.test_after_fit=false", "scheduler.warmup_steps=2"]
    out = cli("train", *common, "data.batch_size=8", "distributed.nproc_per_node=2", "trainer.compile=true",
              "hydra.run.dir=outputs/ddp", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("train", *common, "data.batch_size=16", "hydra.run.dir=outputs/single")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/single/checkpoints/last.pt"), atol=1e-5)
