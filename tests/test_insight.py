"""Profiler traces, layer statistics and activation checkpointing switches."""

from __future__ import annotations

from collections import Counter

import torch

from trainkit import train_model
from trainkit.models import MLP

QUICK = ["+experiment=digits_mlp", "trainer.max_steps=12", "scheduler=none", "logging.progress_bar=false"]


def tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = set()
    for events in (run_dir / "tb").glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"histograms": 0, "scalars": 0})
        accumulator.Reload()
        found |= set(accumulator.Tags()["histograms"]) | set(accumulator.Tags()["scalars"])
    return found


def test_profiler_writes_a_trace_and_prints_top_operators(compose, tmp_path, caplog):
    caplog.set_level("INFO")
    train_model(compose([*QUICK, "trainer.profile=true", "trainer.profile_wait_steps=1",
                         "trainer.profile_warmup_steps=1", "trainer.profile_active_steps=3"]), run_dir=tmp_path / "run")
    assert list((tmp_path / "run" / "profile").glob("*.pt.trace.json"))
    assert "top operators by self time" in caplog.text and "aten::" in caplog.text


def test_layer_histograms_only_when_asked(compose, tmp_path):
    train_model(compose([*QUICK, "logging.histograms_every_n_steps=5"]), run_dir=tmp_path / "on")
    found = tags(tmp_path / "on")
    assert {"weights/head.weight", "grads/head.weight", "grad_norm/head.weight"} <= found
    train_model(compose(QUICK), run_dir=tmp_path / "off")
    assert not any(tag.startswith(("weights/", "grads/")) for tag in tags(tmp_path / "off"))


def test_mlp_gradient_checkpointing_recomputes_and_gives_the_same_gradients():
    """A checkpointed block runs twice a training step (again in backward, with the same
    dropout mask); the gradients equal the plain model's (float64: only rounding may differ)."""
    torch.manual_seed(0)
    plain = MLP(64, 10, hidden_sizes=[32, 32], dropout=0.3).double()
    checkpointed = MLP(64, 10, hidden_sizes=[32, 32], dropout=0.3, gradient_checkpointing=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(16, 64, dtype=torch.float64), torch.randint(0, 10, (16,))
    calls = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        calls[name] = []
        # The block's Linear: checkpointing stops a recomputation once it has what backward needs.
        model.blocks[0][0].register_forward_hook(lambda *args, seen=calls[name]: seen.append(1))
        torch.manual_seed(1)  # the same dropout masks for both
        torch.nn.functional.cross_entropy(model(x), y).backward()
    assert len(calls["plain"]) == 1 and len(calls["checkpointed"]) == 2
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0, msg=name)


def test_gradient_checkpointing_switch_from_the_command_line(compose, tmp_path):
    """model.gradient_checkpointing=true: each hidden block's Linear runs twice a training
    step (the recomputation in backward) and the head once; off, each runs once."""
    calls: list[int] = []

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and module.training:
            calls.append(module.out_features)

    counts = {}
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        for switch in ("true", "false"):
            calls.clear()
            result = train_model(compose([*QUICK, f"model.gradient_checkpointing={switch}"]), run_dir=tmp_path / switch)
            assert result.global_step == 12
            counts[switch] = Counter(calls)
    finally:
        hook.remove()
    assert counts["false"] == {256: 12, 128: 12, 10: 12}  # digits_mlp: 64 -> 256 -> 128 -> 10
    assert counts["true"] == {256: 24, 128: 24, 10: 12}
