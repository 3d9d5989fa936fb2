"""The techniques issue 18 promises under ``distributed.strategy=fsdp`` (2 ranks, gloo on CPU, one
thread per rank), each against the same run under DDP: LoRA with ``trainer.compile`` and the
MLP's gradient checkpointing, the Transformer's gradient checkpointing, distillation from a
replicated teacher (float64: equal to 1e-8), and ``precision=fp16`` with its GradScaler (close,
finite, the scaler's state in the sharded checkpoint); and a Hugging Face model's gradient
checkpointing and ``generate`` against one process with the doubled batch. A ``Watch`` callback reports from inside
each rank what a weight comparison cannot see: whether anything was compiled, how often a block
ran forward, whether the teacher was sharded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_weights

from trainkit.callbacks import Callback
from trainkit.core import checkpoint

pytestmark = [pytest.mark.ddp, pytest.mark.slow]
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]
# float64 and nothing random: fsdp and ddp differ only in summation order (see tests/test_fsdp.py)
EXACT = ["data.shuffle=false", "precision=fp64", "trainer.test_after_fit=false", "trainer.log_every_n_steps=2"]
# Equal widths: one compiled graph serves both blocks (each graph costs seconds to compile)
DIGITS = ["+experiment=digits_mlp", "model.hidden_sizes=[64,64]", "model.dropout=0", "data.batch_size=8",
          "trainer.max_steps=6", "scheduler.warmup_steps=2"]


class Watch(Callback):
    """Writes what one rank's run did to ``folder/rank<r>.json`` at the end of fit: Dynamo's
    compiled graph count, training forward calls of the model's first FSDP block (gradient
    checkpointing runs it again in backward; ``inside``: of the block's first ``nn.Linear``, for
    transformers, which checkpoints a layer's forward and not its hooks), whether the model and
    a distillation teacher are sharded; and the model's full parameters, frozen ones included,
    to ``rank<r>.pt``. The block's own hooks run outside a compiled forward: a hook inside it
    would be traced (and recompiled for every new count)."""

    def __init__(self, folder: str, inside: bool = False):
        self.folder, self.inside, self.forward_calls = Path(folder), inside, 0

    def on_fit_start(self, trainer: Any) -> None:
        def count(module: Any, inputs: Any) -> None:
            self.forward_calls += module.training and torch.is_grad_enabled()

        block = trainer.model.fsdp_blocks()[0]
        watched = next(m for m in block.modules() if isinstance(m, torch.nn.Linear)) if self.inside else block
        watched.register_forward_pre_hook(count)

    def on_fit_end(self, trainer: Any) -> None:
        from torch._dynamo.utils import counters
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        teacher = getattr(getattr(trainer.task, "loss_fn", None), "teacher", None)
        facts = {"graphs": counters["stats"]["unique_graphs"], "forward_calls": self.forward_calls,
                 "sharded": isinstance(trainer.model, FSDPModule),
                 "trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)}
        if teacher is not None:
            facts["teacher_sharded"] = any(isinstance(m, FSDPModule) for m in teacher.modules()) or any(
                isinstance(p, DTensor) for p in teacher.parameters())
            facts["teacher_training"] = any(m.training for m in teacher.modules())
        full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()  # every rank: a collective
                for name, p in trainer.model.named_parameters()}
        torch.save(full, self.folder / f"rank{trainer.dist.rank}.pt")
        (self.folder / f"rank{trainer.dist.rank}.json").write_text(json.dumps(facts))


def train(cli, name: str, *args: str, strategy: str, inside: bool = False) -> dict[str, Any]:
    """A 2-rank run watched by ``Watch``: its checkpoint's weights, rank 0's facts and full
    parameters, its logged metrics."""
    folder = cli.cwd / "watch" / name
    folder.mkdir(parents=True)
    out = cli("train", *QUIET, *args, "distributed.nproc_per_node=2", f"distributed.strategy={strategy}",
              f"+callbacks.watch={{_target_: test_fsdp_techniques.Watch, folder: {folder}, inside: {inside}}}",
              f"hydra.run.dir=outputs/{name}")
    assert out.returncode == 0, out.stderr[-3000:]
    checkpoints = cli.cwd / "outputs" / name / "checkpoints"
    last = checkpoints / ("last" if strategy == "fsdp" else "last.pt")
    facts = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    graphs = [rank_facts.pop("graphs") for rank_facts in facts]  # ranks validate different batch shapes
    assert facts[0] == facts[1] and (min(graphs) > 0) == (max(graphs) > 0)
    facts[0]["graphs"] = min(graphs)
    metrics = [json.loads(line) for line in (cli.cwd / "outputs" / name / "metrics.jsonl").read_text().splitlines()]
    return {"last": last, "weights": checkpoint.load(last)["model"], "facts": facts[0], "metrics": metrics,
            "params": torch.load(folder / "rank0.pt", weights_only=True)}


def both(cli, name: str, *args: str, fsdp: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same run under fsdp (plus ``fsdp`` overrides) and ddp."""
    sharded = train(cli, f"{name}-fsdp", *args, *fsdp, strategy="fsdp")
    replicated = train(cli, f"{name}-ddp", *args, strategy="ddp")
    assert sharded["facts"]["sharded"] and not replicated["facts"]["sharded"]
    return sharded, replicated


def logged(run: dict[str, Any], key: str) -> list[float]:
    return [row[key] for row in run["metrics"] if key in row]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A digits_mlp checkpoint (one process, 10 steps): the LoRA base and the distillation teacher."""
    from trainkit import train_model
    from trainkit.cli import compose

    root = tmp_path_factory.mktemp("fsdp_base")
    train_model(compose(["+experiment=digits_mlp", "model.hidden_sizes=[64,64]", "trainer.max_steps=10",
                         "trainer.test_after_fit=false", *QUIET]), run_dir=root)
    return root / "checkpoints" / "last.pt"


def test_lora_compiled_and_checkpointed_under_fsdp_equals_eager_ddp(cli, base):
    sharded, replicated = both(cli, "lora", *DIGITS, *EXACT, "+finetune=lora", f"init_from={base}",
                               "model.gradient_checkpointing=true", fsdp=("trainer.compile=true",))
    assert sharded["facts"]["graphs"] > 0 and replicated["facts"]["graphs"] == 0  # compiled only where asked
    for run in (sharded, replicated):  # the first block ran again in backward: 6 steps x 2
        assert run["facts"]["forward_calls"] == 12
        assert run["facts"]["trainable"] and all(n.endswith(("lora_A", "lora_B")) for n in run["facts"]["trainable"])
    assert set(sharded["weights"]) == set(replicated["weights"]) == {  # adapters and the base's fingerprint only
        *(f"{layer}.lora_{part}" for layer in ("blocks.0.0", "blocks.1.0", "head") for part in "AB"),
        "lora_base_fingerprint"}
    assert_same_weights(sharded["weights"], replicated["weights"], atol=1e-8)
    start = torch.load(base, weights_only=True)["model"]
    for run in (sharded, replicated):
        frozen = {name.replace(".base.", "."): value for name, value in run["params"].items() if "lora_" not in name}
        assert_same_weights(frozen, {name: value.double() for name, value in start.items()})  # not a bit moved
        assert all(value.abs().sum() > 0 for name, value in run["params"].items() if name.endswith("lora_B"))
    assert_same_weights(sharded["params"], replicated["params"], atol=1e-8)


NO_HF_DROPOUT = [f"+model.config.{name}=0" for name in ("dropout", "attention_dropout", "activation_dropout")]


@pytest.mark.parametrize("preset", [["+experiment=nmt_tiny", "model.dropout=0"], ["+experiment=nmt_hf_tiny", *NO_HF_DROPOUT]],
                         ids=["transformer", "hf"])
def test_gradient_checkpointing_under_fsdp_equals_one_process_with_the_doubled_batch(cli, tmp_path, preset):
    """The Transformer checkpoints each sharded layer's call (its FSDP hooks run again in the
    recompute); transformers checkpoints a BART layer's forward inside its hooks. Validation
    decodes: the BART with ``generate``, which under FSDP all-reduced at every token
    (``synced_gpus``) while ranks decoded different batches, and aborted the run."""
    from trainkit import train_model
    from trainkit.cli import compose

    common = [*preset, *EXACT, "trainer.max_steps=3", "data.max_tokens=null", "model.gradient_checkpointing=true",
              "task.max_decode_len=8"]
    sharded = train(cli, "fsdp", *common, "data.batch_size=16", strategy="fsdp", inside="hf" in preset[0])
    assert sharded["facts"]["sharded"] and sharded["facts"]["forward_calls"] == 6  # again in backward: 3 steps x 2
    single = train_model(compose([*common, "data.batch_size=32", *QUIET]), run_dir=tmp_path / "single")
    assert_same_weights(sharded["weights"], checkpoint.load(tmp_path / "single/checkpoints/last.pt")["model"],
                        atol=1e-8)
    final = [row for row in sharded["metrics"] if "val/loss" in row][-1]
    assert final["val/loss"] == pytest.approx(single.metrics["val/loss"], rel=1e-9) and "val/bleu" in final


def test_distillation_under_fsdp_keeps_the_teacher_whole_and_equals_ddp(cli, base):
    sharded, replicated = both(cli, "distill", "+experiment=digits_distill", f"loss.teacher_ckpt={base}",
                               "model.dropout=0", "data.batch_size=8", "trainer.max_steps=6", "scheduler.warmup_steps=2",
                               *EXACT)
    for run in (sharded, replicated):
        assert run["facts"]["teacher_sharded"] is False and run["facts"]["teacher_training"] is False
        assert all(value > 0 for value in logged(run, "train/loss/kd")) and len(logged(run, "train/loss/kd")) == 3
    assert logged(sharded, "train/loss/kd") == pytest.approx(logged(replicated, "train/loss/kd"), rel=1e-10)
    assert_same_weights(sharded["weights"], replicated["weights"], atol=1e-8)


def test_fp16_under_fsdp_scales_the_loss_and_stays_close_to_ddp(cli):
    """fp16 autocast and its GradScaler work on CPU in torch 2.13. FSDP gathers float16
    parameters (its MixedPrecisionPolicy) where DDP's autocast casts float32 ones for each op:
    the same roundings, and both reduce gradients in float32 (equal bit for bit here)."""
    sharded, replicated = both(cli, "fp16", "+experiment=digits_mlp", "data.batch_size=8", "trainer.max_steps=10",
                               "scheduler=none", "data.shuffle=false", "model.dropout=0", "precision=fp16",
                               "trainer.test_after_fit=false", "trainer.log_every_n_steps=5")
    for run in (sharded, replicated):
        losses = logged(run, "train/loss")
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
        assert all(value.dtype == torch.float32 for value in run["weights"].values())  # fp32 master weights
        scaler = checkpoint.load(run["last"], weights=False)["scaler"]
        assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 10  # 10 finite steps, none skipped
    assert_same_weights(sharded["weights"], replicated["weights"], atol=1e-6)


def test_nan_policy_skip_under_fsdp_drops_the_update_on_every_rank(cli):
    """The 4th training forward is NaN on both ranks: the global gradient norm over the shards
    is non-finite, every rank skips the same update, the sharded checkpoint counts it."""
    out = cli("train", *QUIET, *DIGITS, "model._target_=fault_helpers.NanAtCall", "+model.nan_call=4",
              "trainer.nan_policy=skip", "trainer.max_steps=8", "distributed.nproc_per_node=2",
              "distributed.strategy=fsdp", "hydra.run.dir=outputs/nan")
    assert out.returncode == 0, out.stderr[-3000:]
    last = cli.cwd / "outputs" / "nan" / "checkpoints" / "last"
    state = checkpoint.read(last)["trainer_state"]
    assert state["skipped_steps"] == 1 and state["global_step"] == 8
    assert all(torch.isfinite(value).all() for value in checkpoint.load(last)["model"].values())
    assert "skipped the update of step 4" in (cli.cwd / "outputs" / "nan" / "train.log").read_text()
