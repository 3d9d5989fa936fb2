"""data=dataset: a user's own map-style torch Dataset per split, named by ``_target_``, batched by
trainkit's plans (exact resume, workers, DDP sharding) with clear errors for what cannot work.
The classes are in tests/dataset_helpers.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.data import DatasetData
from trainkit.run.build import build

# 96 training samples in batches of 16: 6 steps an epoch; 37 validation samples.
BLOBS = ["data=dataset", "data.train._target_=dataset_helpers.Blobs", "data.val._target_=dataset_helpers.Blobs",
         "+data.val.size=37", "data.batch_size=16", "logging.progress_bar=false", "logging.tensorboard=false"]


def run(compose, tmp_path, name, *overrides):
    return train_model(compose([*BLOBS, *overrides]), run_dir=tmp_path / name)


def weights(tmp_path, name):
    return load_weights(tmp_path / name / "checkpoints" / "last.pt")


def test_a_dataset_class_trains_by_target_alone_and_tells_the_model_its_sizes(compose, tmp_path):
    result = run(compose, tmp_path, "run", "data.test._target_=dataset_helpers.Blobs", "trainer.max_epochs=2")
    assert result.global_step == 12
    summary = json.loads((tmp_path / "run/result.json").read_text())
    assert summary["final"]["val/accuracy"] > 0.9 and summary["test"]["test/accuracy"] > 0.9
    model = weights(tmp_path, "run")  # in_features=8 and out_features=3 came from Blobs.runtime_kwargs()
    assert model["blocks.0.0.weight"].shape[1] == 8 and model["head.weight"].shape[0] == 3


def test_each_split_is_built_with_its_own_split_name_and_python_objects_are_taken_as_they_are():
    from dataset_helpers import Blobs

    data = DatasetData(train={"_target_": "dataset_helpers.Blobs"}, val={"_target_": "dataset_helpers.Blobs"},
                       test=Blobs(size=5, split="test"))
    assert [data.splits[split].split for split in ("train", "val", "test")] == ["train", "val", "test"]
    assert not torch.equal(data.splits["train"].x[:5], data.splits["val"].x[:5])
    assert data.runtime_kwargs() == {"in_features": 8, "out_features": 3, "num_classes": 3}
    assert len(data.loader("test").dataset) == 5 and data.loader("nothing") is None


def test_drop_last_drops_a_short_training_batch_only():
    data = DatasetData(train={"_target_": "dataset_helpers.Blobs", "size": 40},
                       val={"_target_": "dataset_helpers.Blobs", "size": 37}, batch_size=16, drop_last=True)
    assert [len(batch[1]) for batch in data.loader("train")] == [16, 16]
    assert [len(batch[1]) for batch in data.loader("val")] == [16, 16, 5]


@pytest.mark.parametrize("collate", ["dataset_helpers.scaled_collate", "dataset_helpers.ScaledCollate"],
                         ids=["function", "class"])
def test_collate_fn_by_target(compose, collate):
    default = build(compose(BLOBS), 0).data.loader("val")
    scaled = build(compose([*BLOBS, f"data.collate_fn._target_={collate}", "+data.collate_fn.scale=2.0"]), 0)
    scaled = scaled.data.loader("val")
    (x, y), (scaled_x, scaled_y) = next(iter(default)), next(iter(scaled))
    assert torch.equal(scaled_x, 2 * x) and torch.equal(scaled_y, y) and len(y) == 16


def test_mid_epoch_resume_is_bitwise_exact(compose, tmp_path):
    common = ["trainer.max_epochs=3", "model.dropout=0.3"]  # dropout: the restored RNG matters too
    run(compose, tmp_path, "whole", *common)
    with pytest.raises(Preempted):
        run(compose, tmp_path, "first", *common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 8}")
    stopped = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)["trainer_state"]
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (1, 2)  # two batches into the second epoch
    run(compose, tmp_path, "second", *common, f"resume={tmp_path / 'first/checkpoints/last.pt'}")
    assert_same_weights(weights(tmp_path, "whole"), weights(tmp_path, "second"))


@pytest.mark.slow
def test_worker_processes_give_the_same_weights(compose, tmp_path):
    common = ["trainer.max_epochs=2", "model.dropout=0.3"]
    run(compose, tmp_path, "workers-0", *common)
    run(compose, tmp_path, "workers-2", *common, "data.num_workers=2")
    assert_same_weights(weights(tmp_path, "workers-0"), weights(tmp_path, "workers-2"))


def test_without_runtime_kwargs_nothing_is_offered_and_the_user_sets_the_sizes(compose):
    plain = [*BLOBS, "data.train._target_=dataset_helpers.PlainBlobs"]
    with pytest.raises(ConfigError, match="in_features"):
        build(compose(plain), 0)
    parts = build(compose([*plain, "++model.in_features=8", "++model.out_features=3", "++task.num_classes=3"]), 0)
    assert parts.data.runtime_kwargs() == {}


@pytest.mark.parametrize("overrides, message", [
    (["data.train._target_=dataset_helpers.Nope"], "data.train._target_='dataset_helpers.Nope' cannot be imported"),
    (["data.train._target_=no_such_package.MyDataset"], "data.train._target_='no_such_package.MyDataset'"),
    (["+data.train.sise=10"], "data.train.sise: not an argument of dataset_helpers.Blobs; did you mean data.train.size?"),
    (["data.train._target_=dataset_helpers.Stream"], "data.train (dataset_helpers.Stream): not a map-style dataset"),
    (["data.train._target_=dataset_helpers.NoLength"], "data.train (dataset_helpers.NoLength): has no __len__"),
    (["data.val.size=0"], "data.val (dataset_helpers.Blobs): the dataset is empty"),
    (["data.train._target_=dataset_helpers.BadRuntime"], "runtime_kwargs() must return a dict"),
    (["+data.test.size=5"], "data.test: arguments (size) without a _target_"),
    (["data.collate_fn._target_=dataset_helpers.scaled_collate", "+data.collate_fn.scal=2"],
     "data.collate_fn.scal: not an argument of dataset_helpers.scaled_collate; did you mean data.collate_fn.scale?"),
    (["data.collate_fn=dataset_helpers.scaled_collate"], "data.collate_fn: expected {_target_: mypkg.collate"),
], ids=["no-class", "no-module", "typo", "iterable", "no-len", "empty", "bad-runtime", "no-target", "collate-typo",
        "collate-string"])
def test_bad_datasets_are_config_errors_naming_the_key(compose, overrides, message):
    with pytest.raises(ConfigError) as error:
        build(compose([*BLOBS, *overrides]), 0)
    assert message in str(error.value)


def test_a_missing_train_target_names_the_key(compose):
    with pytest.raises(ConfigError, match=r"data\.train\._target_: required"):
        build(compose(["data=dataset"]), 0)


def test_the_command_line_trains_a_dataset_class_and_a_typo_is_exit_2(cli, tmp_path):
    out = cli("train", *BLOBS, "trainer.max_epochs=1", "hydra.run.dir=outputs/run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/accuracy" in json.loads((tmp_path / "outputs/run/result.json").read_text())["final"]
    out = cli("train", *BLOBS, "+data.train.sise=10")
    assert out.returncode == 2 and "data.train.sise" in out.stderr and "data.train.size" in out.stderr


def test_the_preset_trains_the_example_dataset_class(compose, tmp_path):
    cfg = compose(["+experiment=dataset_digits", "trainer.max_steps=2", "scheduler.warmup_steps=1",
                   "logging.progress_bar=false", "logging.tensorboard=false"])
    result = train_model(cfg, run_dir=tmp_path / "run")
    assert result.global_step == 2 and "test/accuracy" in result.test
    sizes = {split: len(dataset) for split, dataset in build(cfg, 0).data.splits.items()}
    assert sizes == {"train": 1259, "val": 269, "test": 269}


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch_and_see_every_validation_sample_once(cli, tmp_path):
    # 96 samples: 2 ranks x 8 equal one process x 16, step for step (no shuffling, float64);
    # 37 validation samples in 5 batches of 8 over 2 ranks: uneven shards, each sample once.
    common = [*BLOBS, "data.shuffle=false", "model.dropout=0", "trainer.max_epochs=2", "precision=fp64"]
    out = cli("train", *common, "data.batch_size=8", "distributed.nproc_per_node=2", "hydra.run.dir=outputs/ddp")
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("train", *common, "data.batch_size=16", "hydra.run.dir=outputs/single")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/single/checkpoints/last.pt"), atol=1e-10)
    finals = [json.loads((tmp_path / f"outputs/{name}/result.json").read_text())["final"] for name in ("ddp", "single")]
    assert finals[0].keys() == finals[1].keys(), finals
    for key, value in finals[1].items():
        assert finals[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_eval_rebuilds_the_datasets_of_a_checkpoint_with_the_trusted_module(cli, compose, tmp_path):
    run(compose, tmp_path, "run", "trainer.max_epochs=1")
    out = cli("eval", f"ckpt={tmp_path / 'run/checkpoints/last.pt'}", "split=val", "trust=[dataset_helpers]")
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "run/result.json").read_text())["final"]
    for key, value in json.loads(out.stdout).items():
        assert final[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
