"""data=table: every file format, every split option, what is learned from the training rows only,
classification vs regression, exact resume, clear errors for bad tables, and the one-command run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.feather as feather
import pyarrow.parquet as parquet
import pytest
import torch
from conftest import assert_same_weights, load_weights

from trainkit import train_model
from trainkit.core.errors import ConfigError, Preempted
from trainkit.data import TableData
from trainkit.run.build import build
from trainkit.tasks import ClassificationTask, RegressionTask


def synthetic(rows: int = 60, seed: int = 0) -> dict[str, list]:
    """x (float), n (int), color (string), label (string): label depends on x and color."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=rows).round(4)
    colors = rng.choice(["red", "green", "blue"], rows)
    label = np.where(x + (colors == "red") > 0.5, "yes", "no")
    return {"x": x.tolist(), "n": rng.integers(0, 5, rows).tolist(), "color": colors.tolist(), "label": label.tolist()}


def write(columns: dict[str, list], path) -> str:
    """One table in the format of ``path``'s extension."""
    table = pa.table(columns)
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        pa_csv.write_csv(table, path, pa_csv.WriteOptions(delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        parquet.write_table(table, path)
    elif suffix == ".feather":
        feather.write_feather(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    return str(path)


def table(train, **options) -> TableData:
    return TableData(train_path=str(train), **{"target": "label", "categorical": ["color"], **options})


def test_every_format_gives_the_same_tensors(tmp_path):
    train, val = synthetic(60, 0), synthetic(20, 1)
    loaded = {suffix: table(write(train, tmp_path / f"train{suffix}"), valid_path=write(val, tmp_path / f"val{suffix}"))
              for suffix in (".csv", ".tsv", ".parquet", ".jsonl", ".feather")}
    first = loaded.pop(".csv")
    assert first.feature_names() == ["x", "n", "color=blue", "color=green", "color=red", "color=<unseen>"]
    for suffix, data in loaded.items():
        for split in ("train", "val"):
            for mine, theirs in zip(first.splits[split].tensors, data.splits[split].tensors):
                assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (suffix, split)


def test_split_by_fraction_is_seeded_and_covers_every_row_once(tmp_path):
    columns = synthetic(50)
    columns["row"] = list(range(50))
    path = write(columns, tmp_path / "t.csv")

    def rows(data, split):  # the row feature, undone from its standardisation
        mean, std = data.encoding.scale["row"]
        return sorted(round(v * std + mean) for v in data.splits[split].tensors[0][:, data.feature_names().index("row")].tolist())

    data = table(path, val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = {split: rows(data, split) for split in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [35, 10, 5]
    assert sorted(sum(parts.values(), [])) == list(range(50))
    assert rows(table(path, val_fraction=0.2, test_fraction=0.1, seed=3), "val") == parts["val"]
    assert rows(table(path, val_fraction=0.2, test_fraction=0.1, seed=4), "val") != parts["val"]
    assert len(table(path).splits["val"]) == 10  # nothing given: 0.2 of the rows validate
    assert "test" not in table(path).splits


def test_split_by_column_and_by_paths(tmp_path):
    columns = synthetic(30)
    columns["split"] = ["train"] * 20 + ["val"] * 6 + ["test"] * 4
    data = table(write(columns, tmp_path / "t.parquet"))
    assert {split: len(d) for split, d in data.splits.items()} == {"train": 20, "val": 6, "test": 4}
    assert "split" not in data.feature_names()
    with pytest.raises(ConfigError, match="data.val_fraction.*split"):
        table(tmp_path / "t.parquet", val_fraction=0.1)
    columns["split"][3] = "holdout"
    with pytest.raises(ConfigError, match=r"t.csv: column 'split', row 4 holds 'holdout'"):
        table(write(columns, tmp_path / "t.csv"))
    paths = {key: write(synthetic(rows, seed), tmp_path / f"{key}.jsonl")
             for key, rows, seed in (("train", 30, 0), ("valid", 7, 1), ("test", 5, 2))}
    data = table(paths["train"], valid_path=paths["valid"], test_path=paths["test"])
    assert {split: len(d) for split, d in data.splits.items()} == {"train": 30, "val": 7, "test": 5}


def test_codes_and_standardisation_come_from_the_training_rows_only(tmp_path):
    train, val = synthetic(40, 0), synthetic(10, 1)
    val["color"][2] = "purple"  # only in validation: the unseen code
    val["x"] = [value + 100.0 for value in val["x"]]  # validation statistics far from training's
    data = table(write(train, tmp_path / "train.csv"), valid_path=write(val, tmp_path / "val.csv"))
    x_train = np.array(train["x"])
    assert data.encoding.scale["x"] == pytest.approx([x_train.mean(), x_train.std()])
    features = data.splits["val"].tensors[0]
    expected = (np.array(val["x"]) - x_train.mean()) / x_train.std()
    assert torch.allclose(features[:, 0], torch.tensor(expected, dtype=torch.float32))
    assert features[2, 2:].tolist() == [0, 0, 0, 1]  # blue, green, red, <unseen>
    assert features[:, 5].sum() == 1
    assert data.encoding.categories["color"] == ["blue", "green", "red"]
    # A checkpoint's state replaces learning: other training rows, the same encoding.
    other = synthetic(40, 7)
    other["x"] = [value * 3 for value in other["x"]]
    again = table(write(other, tmp_path / "other.csv"), data_state=data.state_dict())
    assert again.encoding == data.encoding
    assert table(tmp_path / "other.csv").encoding.scale != data.encoding.scale


@pytest.mark.parametrize("values, task, kind, classes", [
    (["b", "a", "c"], "auto", ClassificationTask, ["a", "b", "c"]),
    ([10, 2, 1], "auto", ClassificationTask, ["1", "2", "10"]),
    ([True, False, True], "auto", ClassificationTask, ["false", "true"]),
    ([0.5, 1.25, 2.0], "auto", RegressionTask, None),
    ([10, 2, 1], "regression", RegressionTask, None),
    ([1.0, 0.0, 1.0], "classification", ClassificationTask, ["0", "1"]),
], ids=["strings", "integers", "booleans", "floats", "task=regression", "task=classification"])
def test_the_task_follows_the_target_type_unless_task_is_given(compose, tmp_path, values, task, kind, classes):
    columns = {"x": [float(i) for i in range(30)], "label": values * 10}
    path = write(columns, tmp_path / "t.csv")
    overrides = {"auto": ["task=auto"], "regression": ["task=regression", "loss=mse"],
                 "classification": ["task=classification"]}[task]
    cfg = compose(["data=table", f"data.train_path={path}", "data.target=label", *overrides])
    parts = build(cfg, cfg.seed)
    assert type(parts.task) is kind and parts.data.encoding.classes == classes
    targets = parts.data.splits["train"].tensors[1]
    if classes:
        assert targets.dtype == torch.int64 and parts.data.runtime_kwargs()["num_classes"] == len(classes)
    else:
        assert targets.dtype == torch.float32 and targets.shape[1] == 1 and "num_classes" not in parts.data.runtime_kwargs()


def test_mid_epoch_resume_is_bitwise_exact(compose, tmp_path):
    # 200 rows: 160 train in batches of 16 = 10 steps an epoch; the stop at step 14 is mid-epoch 2.
    path = write(synthetic(200), tmp_path / "t.csv")
    common = ["data=table", f"data.train_path={path}", "data.target=label", "data.categorical=[color]",
              "data.batch_size=16", "trainer.max_epochs=3", "model.dropout=0.3", "model.hidden_sizes=[16]",
              "logging.progress_bar=false", "logging.tensorboard=false"]
    train_model(compose(common), run_dir=tmp_path / "whole")
    with pytest.raises(Preempted):
        train_model(compose([*common, "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: 14}"]),
                    run_dir=tmp_path / "first")
    stopped = torch.load(tmp_path / "first/checkpoints/last.pt", weights_only=True)
    assert stopped["trainer_state"]["batch_in_epoch"] == 4
    assert stopped["data"]["table"]["categories"] == {"color": ["blue", "green", "red"]}
    train_model(compose([*common, f"resume={tmp_path / 'first/checkpoints/last.pt'}"]), run_dir=tmp_path / "second")
    assert_same_weights(load_weights(tmp_path / "whole/checkpoints/last.pt"),
                        load_weights(tmp_path / "second/checkpoints/last.pt"))


def bad_tables(tmp_path):
    """(path, options, what the message must say) for each bad input."""
    cases = {}
    columns = synthetic(20)
    columns["x"][6] = None
    cases["missing value"] = (write(columns, tmp_path / "missing.csv"), {}, r"missing.csv: column 'x', row 7")
    cases["missing column"] = (write(synthetic(20), tmp_path / "cols.parquet"), {"target": "lable"},
                               r"data.target: .*cols.parquet has no column 'lable'; did you mean label\?")
    columns = synthetic(20)
    columns["n"] = [str(v) for v in columns["n"]]
    columns["n"][4] = "four"
    cases["non-numeric feature"] = (write(columns, tmp_path / "text.jsonl"), {},
                                    r"text.jsonl: column 'n', row 5 holds 'four'.*data.categorical=\[n\]")
    columns = synthetic(20)
    columns["label"] = ["yes"] * 20
    cases["one class"] = (write(columns, tmp_path / "one.feather"), {}, r"label.*one.feather hold one class \('yes'\)")
    (tmp_path / "t.xlsx").write_text("x")
    cases["unknown extension"] = (str(tmp_path / "t.xlsx"), {}, r"t.xlsx: unknown file type '.xlsx'")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file at all")
    cases["unreadable file"] = (str(tmp_path / "broken.parquet"), {}, r"broken.parquet: cannot be read as parquet")
    val = synthetic(10, 1)
    val["label"][3] = "maybe"
    cases["unknown label"] = (write(synthetic(20), tmp_path / "a.csv"), {"valid_path": write(val, tmp_path / "b.csv")},
                              r"b.csv: column 'label', row 4 holds the label 'maybe'")
    return cases


@pytest.mark.parametrize("case", ["missing value", "missing column", "non-numeric feature", "one class",
                                  "unknown extension", "unreadable file", "unknown label"])
def test_bad_tables_name_file_column_and_row(tmp_path, case):
    path, options, message = bad_tables(tmp_path)[case]
    with pytest.raises(ConfigError, match=message):
        table(path, **options)


def test_one_command_trains_on_a_users_csv(cli, tmp_path):
    write(synthetic(120), tmp_path / "my.csv")
    out = cli("train", "data=table", "data.train_path=my.csv", "data.target=label", "data.categorical=[color]",
              "trainer.max_epochs=2", "hydra.run.dir=run", "logging.progress_bar=false")
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((tmp_path / "run/result.json").read_text())["final"]
    assert 0.0 <= final["val/accuracy"] <= 1.0
    out = cli("train", "data=table", "data.train_path=my.csv", "data.target=color", "hydra.run.dir=bad")
    assert out.returncode == 2 and "column 'label', row 1 holds 'no'" in out.stderr, out.stderr[-3000:]


def test_the_table_preset_learns(compose, tmp_path):
    cfg = compose(["+experiment=table_mlp", "trainer.max_epochs=3", "logging.progress_bar=false",
                   "logging.tensorboard=false"])
    result = train_model(cfg, run_dir=tmp_path / "run")
    assert result.metrics["val/accuracy"] > 0.85 and "test/accuracy" in result.test


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_double_batch_and_see_every_validation_sample_once(cli, tmp_path):
    # 160 training rows: 2 ranks x 8 equal one process x 16, step for step (no shuffling,
    # float64); 37 validation rows: uneven shards over 2 ranks, each row evaluated once.
    train = write(synthetic(160, seed=1), tmp_path / "train.parquet")
    valid = write(synthetic(37, seed=2), tmp_path / "valid.csv")
    common = ["train", "data=table", f"data.train_path={train}", f"data.valid_path={valid}", "data.target=label",
              "data.categorical=[color]", "data.shuffle=false", "model.dropout=0", "model.hidden_sizes=[16]",
              "trainer.max_epochs=2", "precision=fp64", "logging.tensorboard=false"]
    out = cli(*common, "data.batch_size=8", "distributed.nproc_per_node=2", "hydra.run.dir=outputs/ddp")
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli(*common, "data.batch_size=16", "hydra.run.dir=outputs/single")
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(tmp_path / "outputs/single/checkpoints/last.pt"), atol=1e-10)
    finals = [json.loads((tmp_path / f"outputs/{name}/result.json").read_text())["final"] for name in ("ddp", "single")]
    assert finals[0].keys() == finals[1].keys() and "val/accuracy" in finals[1], finals
    for key, value in finals[1].items():
        assert finals[0][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
