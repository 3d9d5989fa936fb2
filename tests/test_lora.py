"""LoRA fine-tuning from init_from: frozen base, adapters only in checkpoints, exact merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.commands.export import export_checkpoint, plain_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.engine.loop import Trainer
from trainkit.models import Transformer
from trainkit.run.build import build
from trainkit.techniques.lora import LoRALinear, apply_lora, merge_lora

DIGITS = ["+experiment=digits_mlp", "trainer.max_steps=20", "scheduler.warmup_steps=5", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A quick digits_mlp checkpoint to fine-tune from."""
    from trainkit.cli import compose

    root = tmp_path_factory.mktemp("lora-base")
    train_model(compose(DIGITS), run_dir=root / "run")
    return root / "run" / "checkpoints" / "last.pt"


def lora_overrides(base: Path, *extra: str) -> list[str]:
    return [*DIGITS, "+finetune=lora", f"init_from={base}", *extra]


def batch_features(parts) -> torch.Tensor:
    return next(iter(parts.data.loader("val")))[0]


def test_at_init_the_lora_model_equals_the_base(compose, base):
    plain = build(compose([*DIGITS, f"init_from={base}"]), 0)
    adapted = build(compose(lora_overrides(base)), 0)
    x = batch_features(plain)
    with torch.no_grad():
        assert torch.equal(adapted.model.eval()(x), plain.model.eval()(x))
    assert_same_weights(plain.model.state_dict(), load_weights(base))


def test_only_adapters_train_and_the_base_stays_frozen(compose, base):
    parts = build(compose(lora_overrides(base, "finetune.rank=4", "finetune.dropout=0.1")), 0)
    trainable = {name for name, p in parts.model.named_parameters() if p.requires_grad}
    assert trainable and all(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for name in trainable)
    # 64 -> 256 -> 128 -> 10: rank * (in + out) per adapted layer
    assert sum(p.numel() for p in parts.model.parameters() if p.requires_grad) == 4 * (64 + 256 + 256 + 128 + 128 + 10)
    optimized = {id(p) for group in parts.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in parts.model.parameters() if p.requires_grad}
    trainer = Trainer(parts.model, parts.optimizer, task=parts.task, scheduler=parts.scheduler, max_steps=15)
    trainer.fit(parts.data.loader("train"))
    frozen = {name.replace(".base.", "."): p for name, p in parts.model.named_parameters() if not p.requires_grad}
    assert_same_weights(frozen, load_weights(base))
    assert all(float(m.lora_B.detach().abs().sum()) > 0 for m in parts.model.modules() if isinstance(m, LoRALinear))
    # the merged model computes the same function
    merged = copy.deepcopy(parts.model)
    assert merge_lora(merged) == 3
    assert not any(isinstance(m, LoRALinear) for m in merged.modules()) and set(merged.state_dict()) == set(load_weights(base))
    x = batch_features(parts)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(x), parts.model.eval()(x), atol=1e-5, rtol=0)


def test_checkpoints_hold_adapters_only_and_resume_exactly(compose, base, tmp_path):
    common = lora_overrides(base, "finetune.dropout=0.2", "trainer.max_steps=12", "trainer.log_every_n_steps=5")
    train_model(compose(common), run_dir=tmp_path / "whole")
    with pytest.raises(Preempted):
        train_model(compose([*common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 7}"]),
                    run_dir=tmp_path / "first")
    train_model(compose([*common, f"resume={tmp_path / 'first/checkpoints/last.pt'}"]), run_dir=tmp_path / "second")
    whole = load_weights(tmp_path / "whole/checkpoints/last.pt")
    assert all(k.endswith(("lora_A", "lora_B")) for k in whole if k != "lora_base_fingerprint")
    assert_same_weights(whole, load_weights(tmp_path / "second/checkpoints/last.pt"))


def test_merged_checkpoint_is_plain_and_equal(compose, base, tmp_path):
    run = tmp_path / "lora"
    train_model(compose(lora_overrides(base, "trainer.max_steps=10")), run_dir=run)
    adapted, _, _ = plain_model(run / "checkpoints/last.pt")  # merged in memory
    [merged_path] = export_checkpoint(run / "checkpoints/last.pt", "merged", tmp_path / "merged.pt")
    merged = torch.load(merged_path, weights_only=True)
    assert set(merged["model"]) == set(load_weights(base)) and "finetune: null" in merged["config"]
    plain = build(compose([*DIGITS, f"init_from={merged_path}"]), 0)  # a plain checkpoint starts a new run
    x = batch_features(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.model.eval()(x), adapted(x), atol=1e-5, rtol=0)
        assert not torch.allclose(plain.model(x), build(compose([*DIGITS, f"init_from={base}"]), 0).model.eval()(x))


def test_adapters_refuse_a_changed_base(compose, base, tmp_path):
    import shutil

    moved = tmp_path / "base.pt"
    shutil.copy(base, moved)
    train_model(compose(lora_overrides(moved, "trainer.max_steps=5", "scheduler.warmup_steps=1")), run_dir=tmp_path / "lora")
    train_model(compose([*DIGITS, "seed=1"]), run_dir=tmp_path / "other")
    shutil.copy(tmp_path / "other/checkpoints/last.pt", moved)
    with pytest.raises(ConfigError, match="other base weights"):
        export_checkpoint(tmp_path / "lora/checkpoints/last.pt", "merged", tmp_path / "m.pt")


@pytest.mark.parametrize("overrides, message", [
    (["+finetune=lora"], "needs init_from"),
    (["+finetune=lora", "INIT", "+finetune.rnak=4"], "did you mean finetune.rank"),
    (["+finetune=lora", "INIT", "finetune.targets=[nothing]"], "matches no untied nn.Linear"),
    (["+finetune=lora", "INIT", "finetune.rank=0"], "finetune.rank=0"),
    (["init_from=/no/such.pt"], r"init_from=/no/such.pt: checkpoint /no/such.pt: no such file"),
])
def test_config_errors_name_the_key(compose, base, overrides, message):
    overrides = [f"init_from={base}" if o == "INIT" else o for o in overrides]
    with pytest.raises(ConfigError, match=message):
        build(compose([*DIGITS, *overrides]), 0)


def test_init_from_an_adapter_checkpoint_asks_for_a_merge(compose, base, tmp_path):
    train_model(compose(lora_overrides(base, "trainer.max_steps=5", "scheduler.warmup_steps=1")), run_dir=tmp_path / "lora")
    with pytest.raises(ConfigError, match="format=merged"):
        build(compose([*DIGITS, f"init_from={tmp_path / 'lora/checkpoints/last.pt'}"]), 0)


def test_transformer_leaves_the_tied_output_projection_out_and_merges_exactly():
    torch.manual_seed(0)
    model = Transformer(40, 40, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                        ffn_dim=32, dropout=0.0).eval()
    count = apply_lora(model, rank=2, alpha=4.0)
    assert count == 16  # 3 attentions x (q, k, v, out) + 2 feed-forwards x 2; output_proj is tied
    assert not isinstance(model.output_proj, LoRALinear)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_B, std=0.1)
    src, tgt = torch.randint(1, 40, (3, 6)), torch.randint(1, 40, (3, 4))
    with torch.no_grad():
        adapted = model(src, tgt)
        merge_lora(model)
        torch.testing.assert_close(model(src, tgt), adapted, atol=1e-5, rtol=0)
    assert model.output_proj.weight is model.tgt_embed.weight


def test_lora_from_the_command_line_prints_the_trainable_count(cli, base, tmp_path):
    done = cli("train", *lora_overrides(base, "trainer.max_steps=5", "scheduler.warmup_steps=1"),
               f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr
    assert "6,736 trainable of 57,562 parameters" in done.stdout + done.stderr
    assert (tmp_path / "run/checkpoints/last.pt").is_file()
