"""Batch plans (an empty one is refused), shipped data, and the token-normalised loss of the
seq2seq task."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from trainkit import Trainer
from trainkit.core.errors import ConfigError
from trainkit.data.sampler import FixedBatches, TokenBatches


def covered(batches):
    return Counter(i for batch in batches for i in batch)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_token_buckets_cover_every_sample_once_per_epoch(world_size):
    lengths = torch.randint(1, 40, (997,), generator=torch.Generator().manual_seed(0)).tolist()
    for epoch in range(3):
        shards = [TokenBatches(lengths, 256, seed=7, rank=r, world_size=world_size, even=False) for r in range(world_size)]
        for shard in shards:
            shard.set_epoch(epoch)
        counts = covered(b for shard in shards for b in shard)
        assert counts == Counter(range(997))
        for shard in shards:
            for batch in shard:
                assert max(lengths[i] for i in batch) * len(batch) <= 256


def test_token_buckets_keep_padding_small_and_change_every_epoch():
    lengths = torch.randint(3, 30, (5000,), generator=torch.Generator().manual_seed(1)).tolist()
    plan = TokenBatches(lengths, 1024, seed=0)
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in plan.batches(0))
    assert (padded - real) / padded < 0.05
    assert plan.batches(0) != plan.batches(1)
    assert plan.batches(1) == TokenBatches(lengths, 1024, seed=0).batches(1)  # a pure function of (seed, epoch)


def test_training_shards_are_even_and_disjoint():
    plans = [FixedBatches(103, 10, seed=3, rank=r, world_size=2, even=True) for r in range(2)]
    shards = [list(p) for p in plans]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(covered(shards[0])) & set(covered(shards[1]))


def test_resume_offset_skips_by_index():
    plan = FixedBatches(100, 8, seed=5)
    plan.set_epoch(2)
    whole = list(plan)
    plan.set_epoch(2, start=5)
    assert list(plan) == whole[5:]
    assert len(plan) == len(whole)


def test_plan_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(FixedBatches(50, 7, seed=1))
    list(TokenBatches([5] * 50, 20, seed=1))
    assert torch.equal(torch.rand(3), expected)


class EmptyEpochs:
    """A loader without batches that fails the test instead of hanging when iterated too often."""

    def __init__(self):
        self.epochs = 0

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        self.epochs += 1
        if self.epochs > 3:
            raise RuntimeError("the loop keeps asking for epochs of an empty loader")
        return iter(())


def test_an_empty_batch_plan_is_refused_with_max_steps():
    model = nn.Linear(2, 2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(reduction="sum"),
                      max_steps=5)
    with pytest.raises(ConfigError, match="no batches"):
        trainer.fit(EmptyEpochs())

def test_malformed_tsv_names_file_and_line(tmp_path):
    from trainkit.data.translation import read_tsv

    path = tmp_path / "train.tsv"
    path.write_text("one\teins\ntwo zwei\n")
    with pytest.raises(ConfigError, match=r"train.tsv:2"):
        read_tsv(path)
    path.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_tsv(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_tsv(tmp_path / "missing.tsv")


def test_shipped_digits_splits():
    from trainkit.data import ArrayData

    data = ArrayData("digits")
    sizes = {name: len(ds) for name, ds in data.splits.items()}
    assert sizes == {"train": 1259, "val": 269, "test": 269}
    x, y = next(iter(data.loader("train")))
    assert x.shape == (64, 64) and float(x.max()) <= 1.0 and y.dtype == torch.long


def seq2seq_weights(compose, tmp_path, name, *overrides):
    from trainkit import train_model
    from trainkit.core.checkpoint import load_weights  # noqa: F401  (import check)

    cfg = compose(["+experiment=nmt_tiny", "data.max_tokens=null", "data.shuffle=false", "model.dropout=0",
                   "trainer.max_steps=12", "task.num_samples=0", "task.metrics=[perplexity]",
                   "trainer.test_after_fit=false", "logging.progress_bar=false", "scheduler.warmup_steps=4",
                   "trainer.monitor=val/loss", "trainer.monitor_mode=min",
                   *overrides])
    train_model(cfg, run_dir=tmp_path / name)
    return torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=True)["model"]


def test_seq2seq_accumulation_is_token_normalised(compose, tmp_path):
    # Micro-batches of different target lengths: a mean of means would weight them wrongly.
    # SGD, because Adam (eps 1e-9) turns float noise on the zero-gradient key biases into
    # full-size updates and would hide what this test looks at.
    sgd = ["optimizer=sgd", "~optimizer.betas", "~optimizer.eps", "scheduler.factor=2"]
    accumulated = seq2seq_weights(compose, tmp_path, "accum", *sgd, "data.batch_size=8", "trainer.grad_accum_steps=4")
    large = seq2seq_weights(compose, tmp_path, "large", *sgd, "data.batch_size=32")
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], atol=1e-5, rtol=0)
