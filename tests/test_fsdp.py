"""``distributed.strategy=fsdp`` (FSDP2 on CPU with gloo, one thread per rank): the same training
as DDP and as one process with the doubled batch; sharded checkpoints that resume bit for bit at
the same world size (fp32, mid-epoch), at 1 and 3 ranks from an epoch boundary, are refused
mid-epoch at another size, survive SIGTERM (exit 75), are read by ``eval``/``export``, and are
refused when tampered with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights

from trainkit.core import checkpoint
from trainkit.core.errors import ConfigError

pytestmark = [pytest.mark.ddp, pytest.mark.slow]
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false"]
# float64: the runs differ only in summation order (fp32 Adam turns that into ~2e-5 after 20
# steps, a bias with a near-zero gradient into ~1e-9 even in float64)
EXACT = ["data.shuffle=false", "model.dropout=0", "trainer.max_steps=20", "scheduler.warmup_steps=5", "precision=fp64"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's full weights from a single-file or a sharded checkpoint."""
    return checkpoint.load(path)["model"]


def train(cli, name: str, *args: str, ranks: int = 1, strategy: str = "ddp") -> Path:
    out = cli("train", *QUIET, *args, f"distributed.nproc_per_node={ranks}", f"distributed.strategy={strategy}",
              f"hydra.run.dir=outputs/{name}")
    assert out.returncode == 0, out.stderr[-3000:]
    return cli.cwd / "outputs" / name / "checkpoints"


@pytest.mark.parametrize("experiment, batch, accum", [("digits_mlp", 8, 2), ("nmt_tiny", 16, 1)],
                         ids=["mlp-accumulation", "transformer"])
def test_fsdp_equals_ddp_equals_one_process_with_the_doubled_batch(cli, experiment, batch, accum):
    common = [f"+experiment={experiment}", *EXACT, f"trainer.grad_accum_steps={accum}", "trainer.test_after_fit=false"]
    if experiment == "nmt_tiny":  # nmt batches by tokens; a fixed sentence count per rank is what doubles
        common = [f"+experiment={experiment}", "data.shuffle=false", "model.dropout=0", "trainer.max_steps=10",
                  "data.max_tokens=null", "trainer.test_after_fit=false", "precision=fp64"]
    fsdp = train(cli, "fsdp", *common, f"data.batch_size={batch}", ranks=2, strategy="fsdp")
    assert (fsdp / "last" / "meta.pt").is_file() and (fsdp / "last").is_symlink()
    assert sorted(p.name for p in (fsdp / "last").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    reference = weights(fsdp / "last")
    if experiment == "digits_mlp":
        ddp = train(cli, "ddp", *common, f"data.batch_size={batch}", ranks=2)
        assert_same_weights(reference, weights(ddp / "last.pt"), atol=1e-8)
    single = train(cli, "single", *common, f"data.batch_size={2 * batch}")
    assert_same_weights(reference, weights(single / "last.pt"), atol=1e-8)
    result = json.loads((cli.cwd / "outputs" / "fsdp" / "result.json").read_text())
    assert result["last_checkpoint"].endswith("checkpoints/last")


# No dropout: ranks draw their own dropout masks, so another world size only equals the original
# run when nothing random happens in a step; float64 as above.
RESUME = ["+experiment=digits_mlp", "data.shuffle=false", "model.dropout=0", "trainer.max_epochs=2", "scheduler=none", "precision=fp64"]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """A 2-rank fsdp run of 2 epochs (42 samples per rank and step), and one stopped after its
    first epoch: (the folder they ran in, the whole run's final weights). 1259 training samples
    make 30 batches of 42, 15 of 84 and 45 of 28, with 83 samples in the last step either way:
    1 rank x 84 and 3 ranks x 28 see the same samples in every step as 2 ranks x 42."""
    from conftest import Cli

    cli = Cli(tmp_path_factory.mktemp("fsdp_resume"))
    whole = train(cli, "whole", *RESUME, "data.batch_size=42", ranks=2, strategy="fsdp")
    train(cli, "first", *RESUME, "trainer.max_epochs=1", "data.batch_size=42", ranks=2, strategy="fsdp")
    return cli, weights(whole / "last")


@pytest.mark.parametrize("ranks, batch", [(1, 84), (3, 28)], ids=["at-1-rank", "at-3-ranks"])
def test_an_epoch_boundary_checkpoint_resumes_at_another_world_size(continued, ranks, batch):
    cli, whole = continued
    first = cli.cwd / "outputs" / "first" / "checkpoints" / "last"
    resumed = train(cli, f"at{ranks}", *RESUME, f"data.batch_size={batch}", f"resume={first}", ranks=ranks,
                    strategy="fsdp")
    name = "last" if ranks > 1 else "last.pt"  # one process shards nothing: it writes a file
    assert_same_weights(whole, weights(resumed / name), atol=1e-8)
    if ranks == 1:  # the adopted sharded best is replaced by files, and its folder goes with it
        assert sorted(p.name for p in resumed.iterdir()) == ["best.pt", "last.pt"]


# The same world size resumes bit for bit, in fp32 as users train, with what a run draws at random
# (shuffling, dropout: every rank's RNG states come back) and a mid-epoch stop whose resume crosses
# an epoch boundary. 15 steps of 2 x 42 samples an epoch: step 23 is batch 8 of epoch 1.
SAME_SIZE = ["+experiment=digits_mlp", "model.dropout=0.1", "trainer.max_epochs=3", "precision=fp32",
             "trainer.test_after_fit=false"]


def test_sigterm_under_fsdp_exits_75_resumes_exactly_and_not_at_another_size_mid_epoch(cli):
    whole = train(cli, "whole", *SAME_SIZE, "data.batch_size=42", ranks=2, strategy="fsdp")
    stop = "+callbacks.term={_target_: fault_helpers.SignalAtStep, step: 23, rank: 1}"
    out = cli("train", *QUIET, *SAME_SIZE, "data.batch_size=42", "distributed.nproc_per_node=2",
              "distributed.strategy=fsdp", "hydra.run.dir=outputs/stopped", stop)
    assert out.returncode == 75, out.stderr[-3000:]
    last = cli.cwd / "outputs" / "stopped" / "checkpoints" / "last"
    assert checkpoint.load(last, weights=False)["trainer_state"]["global_step"] == 23  # every file matches its hash
    assert not [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left
    out = cli("train", *QUIET, *SAME_SIZE, "data.batch_size=84", f"resume={last}", "hydra.run.dir=outputs/refused")
    assert out.returncode == 2 and "in the middle of an epoch" in out.stderr, out.stderr[-3000:]
    resumed = train(cli, "resumed", *SAME_SIZE, "data.batch_size=42", f"resume={last}", ranks=2, strategy="fsdp")
    assert_same_weights(weights(whole / "last"), weights(resumed / "last"))  # bitwise


def test_eval_and_export_read_a_sharded_checkpoint(continued):
    cli, whole = continued
    best = cli.cwd / "outputs" / "whole" / "checkpoints" / "best"
    out = cli("eval", f"ckpt={best}", "split=test")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((cli.cwd / "outputs" / "whole" / "result.json").read_text())
    for key, value in json.loads(out.stdout).items():
        assert summary["test"][key] == pytest.approx(value, rel=1e-6), key
    out = cli("export", f"ckpt={cli.cwd / 'outputs' / 'whole' / 'checkpoints' / 'last'}", "format=pt",
              f"out={cli.cwd / 'consolidated.pt'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(whole, torch.load(cli.cwd / "consolidated.pt", weights_only=True)["model"])


def test_a_tampered_sharded_checkpoint_is_refused(continued, tmp_path):
    import shutil

    cli, _ = continued
    source = (cli.cwd / "outputs" / "whole" / "checkpoints" / "last").resolve()
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    shard = copy / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum mismatch"):
        checkpoint.load(copy)
    out = cli("eval", f"ckpt={copy}", "split=test")
    assert out.returncode == 2 and "checksum mismatch" in out.stderr and "Traceback" not in out.stderr


def test_a_metadata_pickle_that_would_run_code_is_refused(tmp_path):
    """DCP's .metadata is a pickle: only its own classes may be built from it."""
    import os
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    reader = checkpoint.safe_reader(tmp_path)
    with pytest.raises(ConfigError, match="not a checkpoint's metadata"):
        reader.read_metadata()
    assert not (tmp_path / "pwned").exists()
