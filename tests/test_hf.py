"""model=hf and data=text, the way a user fine-tunes a local pretrained transformer on their own
files: the one-command run and its eval without the model folder, exact resume after SIGTERM,
two ranks equal to one process, export format=hf loaded by transformers with equal logits, the
tokenisation cache, sentence pairs, regression, label order, a saved datasets folder, clear
errors, the seq2seq path with generate and translate, LoRA, gradient checkpointing and bf16.

Everything is tiny and offline: hf_helpers writes a 1-layer BERT (hidden 32) and a 1+1-layer
BART (d_model 32) with save_pretrained, and CSV files of a few dozen rows. Subprocesses (each
imports torch and transformers, ~5-9 s) only where the command line itself is under test.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Cli, assert_same_weights, load_weights
from hf_helpers import BERT_SIZES, bart_dir, bert_dir, numbers_pairs, pairs, reviews, write_csv

from trainkit import train_model
from trainkit.core.errors import ConfigError
from trainkit.data import TextData
from trainkit.data.hf_tokenizer import HFTokenizer, from_state, word_tokenizer
from trainkit.data.text import cache_key
from trainkit.run.build import build
from trainkit.tasks import ClassificationTask, RegressionTask

QUIET = ["logging.progress_bar=false", "logging.tensorboard=false"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # subprocesses: any download attempt fails
# What a new user types (paths relative to the folder they run in), 8 steps an epoch.
USER = ["model=hf", "model.pretrained=my-bert", "data=text", "data.train_path=train.csv", "data.valid_path=val.csv",
        "data.target=label", "data.batch_size=8", "trainer.max_epochs=2", *QUIET]
# A BERT built from keys, without dropout (for runs that must equal each other across ranks).
BERT_KEYS = ("model.config={model_type: bert, " + ", ".join(f"{key}: {value}" for key, value in BERT_SIZES.items())
             + ", hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """train.csv (64 rows), val.csv (24 rows) and bert/, a local pretrained BERT with its tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    train = reviews(64, seed=0)
    write_csv(train, root / "train.csv")
    write_csv(reviews(24, seed=1), root / "val.csv")
    bert_dir(root / "bert", train["text"])
    return root


@pytest.fixture(scope="module")
def user_run(files, tmp_path_factory) -> Path:
    """The folder of a user's first run: their CSVs, their model folder my-bert/ and
    outputs/user/run, trained with ``trainkit train`` (the run later tests compare against)."""
    root = tmp_path_factory.mktemp("user")
    for name in ("train.csv", "val.csv"):
        shutil.copy(files / name, root / name)
    shutil.copytree(files / "bert", root / "my-bert")
    out = Cli(root)("train", *USER, "hydra.run.dir=outputs/user/run", env=OFFLINE)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def text_data(files: Path, **options) -> TextData:
    return TextData(**{"train_path": str(files / "train.csv"), "valid_path": str(files / "val.csv"),
                       "target": "label", **options})


# 1. The new user's command, and eval without the model folder --------------------------------
def test_one_command_fine_tunes_a_local_model_and_eval_needs_no_model_folder(user_run):
    from trainkit.commands.inference import evaluate_checkpoint

    run = user_run / "outputs/user/run"
    final = json.loads((run / "result.json").read_text())["final"]
    assert 0.0 <= final["val/accuracy"] <= 1.0
    state = torch.load(run / "checkpoints/best.pt", weights_only=True)
    stored = json.loads(state["runtime"]["hf_config"])
    assert stored["model_type"] == "bert" and stored["hidden_size"] == 32
    assert stored["id2label"] == {"0": "negative", "1": "positive"}
    (user_run / "my-bert").rename(user_run / "elsewhere")  # the model folder is gone
    try:  # what `trainkit eval ckpt=... split=val` runs, here from another folder
        metrics = evaluate_checkpoint(run / "checkpoints/best.pt", split="val")
    finally:
        (user_run / "elsewhere").rename(user_run / "my-bert")
    best = torch.load(run / "checkpoints/best.pt", weights_only=True)["trainer_state"]["best_metric"]
    assert metrics["val/loss"] == pytest.approx(best, rel=1e-6)


# 2. SIGTERM mid-epoch, then resume=auto ----------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_epoch_exits_75_and_resume_auto_is_bitwise_exact(user_run, compose, monkeypatch):
    # 64 rows in batches of 8: 8 steps an epoch, so step 11 is 3 batches into epoch 2.
    out = Cli(user_run)("train", *USER, "+callbacks.term={_target_: fault_helpers.SignalAtStep, step: 11}",
                        "hydra.run.dir=outputs/stopped/first", env=OFFLINE)
    assert out.returncode == 75, out.stderr[-3000:]
    stopped = torch.load(user_run / "outputs/stopped/first/checkpoints/last.pt", weights_only=True)
    assert (stopped["trainer_state"]["global_step"], stopped["trainer_state"]["batch_in_epoch"]) == (11, 3)
    monkeypatch.chdir(user_run)  # the user's folder: the same relative paths
    train_model(compose([*USER, "resume=auto"]), run_dir=user_run / "outputs/stopped/second")
    assert_same_weights(load_weights(user_run / "outputs/user/run/checkpoints/last.pt"),
                        load_weights(user_run / "outputs/stopped/second/checkpoints/last.pt"))


# 3. Two ranks equal one process with the doubled batch ---------------------------------------
@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_the_doubled_batch(cli, compose, tmp_path):
    # 64 training rows: 2 ranks x 8 = 1 x 16, step for step (no shuffling, no dropout, float64);
    # 25 validation rows: uneven shards, each row evaluated once.
    train = write_csv(reviews(64, seed=2), tmp_path / "train.csv")
    valid = write_csv(reviews(25, seed=3), tmp_path / "valid.csv")
    common = ["model=hf", BERT_KEYS, "data=text", f"data.train_path={train}", f"data.valid_path={valid}",
              "data.target=label", "data.shuffle=false", "data.max_length=16", "trainer.max_epochs=2",
              "precision=fp64", "optimizer.lr=3e-3", *QUIET]
    out = cli("train", *common, "data.batch_size=8", "distributed.nproc_per_node=2", "hydra.run.dir=outputs/ddp",
              env={**OFFLINE, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    single = train_model(compose([*common, "data.batch_size=16"]), run_dir=tmp_path / "outputs/single")
    assert_same_weights(load_weights(tmp_path / "outputs/ddp/checkpoints/last.pt"),
                        load_weights(single.last_checkpoint), atol=1e-10)
    final = json.loads((tmp_path / "outputs/ddp/result.json").read_text())["final"]
    assert final.keys() == single.metrics.keys() and "val/accuracy" in final, final
    for key, value in single.metrics.items():
        assert final[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# 4. export format=hf --------------------------------------------------------------------------
def test_export_hf_loads_in_transformers_with_equal_logits(user_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainkit.commands.export import export_checkpoint, plain_model

    ckpt = user_run / "outputs/user/run/checkpoints/best.pt"
    export_checkpoint(ckpt, "hf", tmp_path / "exported")
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert theirs.config.id2label == {0: "negative", 1: "positive"}
    ours = plain_model(ckpt)[0]
    texts = reviews(24, seed=1)["text"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    data = TextData(train_path=str(user_run / "train.csv"), valid_path=str(user_run / "val.csv"), target="label",
                    data_state=torch.load(ckpt, weights_only=True)["data"])
    batch, _ = data.splits["val"][list(range(24))]
    assert torch.equal(inputs["input_ids"], batch["input_ids"])  # the exported tokenizer is the trained one
    with torch.no_grad():
        expected = ours(dict(batch))
        got = theirs(**inputs).logits
    assert expected.shape == (24, 2) and torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert (tmp_path / "exported/trainkit.yaml").is_file()


# 5. The tokenisation cache -------------------------------------------------------------------
def test_second_build_reads_the_cache_and_a_bad_cache_file_is_replaced(files, tmp_path, monkeypatch, caplog):
    options = {"tokenizer": str(files / "bert"), "cache_dir": str(tmp_path), "max_length": 16}
    first = text_data(files, **options)
    cached = sorted((tmp_path / "text").glob("*.npz"))
    assert len(cached) == 2  # train and val

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds these rows")

    with monkeypatch.context() as patch:
        patch.setattr(HFTokenizer, "encode_rows", refuse)
        second = text_data(files, **options)
    for split in ("train", "val"):
        assert np.array_equal(first.splits[split].ids, second.splits[split].ids), split

    vocab = first.tokenizer.vocab_size
    bad = {"garbage": lambda path: path.write_bytes(b"\x00not an npz file" * 7),
           "truncated": lambda path: path.write_bytes(first_bytes[: len(first_bytes) // 2]),
           "ids out of range": lambda path: np.savez(path, ids=np.full(len(first.splits["train"].ids), vocab + 5,
                                                                           dtype=np.int32),
                                                     offsets=first.splits["train"].offsets)}
    train_cache = next(path for path in cached if np.load(path)["offsets"].shape == (65,))
    first_bytes = train_cache.read_bytes()
    for case, spoil in bad.items():
        spoil(train_cache)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainkit"):
            again = text_data(files, **options)
        assert "tokenisation cache" in caplog.text and str(train_cache) in caplog.text, case
        assert np.array_equal(again.splits["train"].ids, first.splits["train"].ids), case
        with np.load(train_cache) as arrays:  # rewritten with the right ids
            assert np.array_equal(arrays["ids"], first.splits["train"].ids), case

    text_data(files, **{**options, "max_length": 12})
    assert len(list((tmp_path / "text").glob("*.npz"))) == 4
    tokenizer = first.tokenizer  # texts that differ only in where a NUL falls keep apart
    assert cache_key(tokenizer, [["a\0b", "c"]], 16) != cache_key(tokenizer, [["a", "b\0c"]], 16)
    text_data(files, **{**options, "tokenizer": None, "vocab_size": 12})  # another tokenizer (word-level, 12 ids)
    assert len(list((tmp_path / "text").glob("*.npz"))) == 6


def test_a_word_level_tokenizer_keeps_its_fingerprint_through_a_checkpoint():
    """Training builds it in memory, eval loads it from the checkpoint's files: the same cache key."""
    tokenizer = word_tokenizer(["the lamp is great", "the chair is not poor"], 50)
    assert from_state(tokenizer.state_dict()).fingerprint() == tokenizer.fingerprint()


def test_a_tampered_tokenizer_in_a_checkpoint_is_exit_2_for_export_and_translate(user_run, tmp_path):
    from trainkit.commands.export import export_checkpoint
    from trainkit.commands.failures import explain
    from trainkit.commands.inference import load_translator
    from trainkit.core import checkpoint

    state = torch.load(user_run / "outputs/user/run/checkpoints/best.pt", weights_only=True)
    state["data"]["tokenizer"]["files"]["tokenizer.json"] = b'{"x": 1}'
    state.pop("checksums", None)
    checkpoint.save(state, tmp_path / "tampered.pt")
    for call in (lambda: export_checkpoint(tmp_path / "tampered.pt", "hf", tmp_path / "out"),
                 lambda: load_translator(tmp_path / "tampered.pt", torch.device("cpu"))):
        with pytest.raises(ConfigError, match="tokenizer") as error:
            call()
        assert explain(error.value)[0] == 2


# 6. Pairs, regression, label order -------------------------------------------------------------
def test_a_token_budget_batches_similar_lengths_and_shards_every_row_once(files):
    """data.max_tokens: each batch pads to at most the budget, one epoch covers every training row
    once, and two ranks' shares of a validation epoch are disjoint and complete."""
    single = text_data(files, max_tokens=64, max_length=16)
    lengths = single.splits["train"].lengths()
    seen = []
    for inputs, _ in single.loader("train"):
        assert inputs["input_ids"].numel() <= 64
        seen.extend(inputs["attention_mask"].sum(1).tolist())
    assert sorted(seen) == sorted(lengths)  # every row once (lengths identify the multiset)
    assert max(lengths) > min(lengths)  # so the budget really varies the batch size
    ranks = [text_data(files, max_tokens=64, max_length=16, rank=rank, world_size=2) for rank in (0, 1)]
    shares = [[row for batch in data.loader("val").sampler for row in batch] for data in ranks]  # the batch plans
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == list(range(len(single.splits["val"])))


def test_sentence_pairs_give_token_type_ids(compose, tmp_path):
    train = write_csv(pairs(48, seed=0), tmp_path / "train.csv")
    valid = write_csv(pairs(16, seed=1), tmp_path / "val.csv")
    data = TextData(train_path=str(train), valid_path=str(valid), text=["premise", "hypothesis"], target="label",
                    cache_dir=str(tmp_path / "cache"))
    inputs, _ = data.splits["train"][[0, 1]]
    first = inputs["input_ids"][0]
    separators = (first == data.tokenizer.eos_id).nonzero().flatten().tolist()
    assert len(separators) == 2  # [CLS] premise [SEP] hypothesis [SEP]
    types = inputs["token_type_ids"][0]
    assert types[: separators[0] + 1].eq(0).all() and types[separators[0] + 1: separators[1] + 1].eq(1).all()


def test_sentence_pairs_train(compose, tmp_path):
    train = write_csv(pairs(48, seed=0), tmp_path / "train.csv")
    valid = write_csv(pairs(16, seed=1), tmp_path / "val.csv")
    result = train_model(compose(["model=hf", BERT_KEYS, "data=text", f"data.train_path={train}",
                                  f"data.valid_path={valid}", "data.text=[premise,hypothesis]", "data.target=label",
                                  "data.batch_size=16", "trainer.max_steps=3", *QUIET]), run_dir=tmp_path / "run")
    assert result.global_step == 3 and 0.0 <= result.metrics["val/accuracy"] <= 1.0


def test_a_float_target_is_regression_under_task_auto(compose, tmp_path):
    columns = reviews(40, seed=4)
    columns["label"] = [round(0.5 + i / 10, 2) for i in range(40)]
    path = write_csv(columns, tmp_path / "scores.csv")
    overrides = ["model=hf", BERT_KEYS, "data=text", f"data.train_path={path}", "data.target=label",
                 "data.batch_size=16", "loss=mse", "trainer.max_steps=2", "trainer.monitor=val/loss", *QUIET]
    cfg = compose(overrides)
    assert cfg.task._target_.endswith("AutoTask")
    parts = build(cfg, cfg.seed)
    assert type(parts.task) is RegressionTask and parts.data.labels.classes is None
    assert parts.model.hf.config.num_labels == 1 and parts.model.hf.config.problem_type == "regression"
    targets = parts.data.splits["train"].targets
    assert targets.dtype == torch.float32 and targets.shape == (32, 1)
    result = train_model(compose(overrides), run_dir=tmp_path / "run")
    assert np.isfinite(result.metrics["val/loss"]) and "val/accuracy" not in result.metrics


def test_label_strings_map_to_sorted_ids_saved_in_the_checkpoint(files, user_run, compose):
    data = text_data(files, cache_dir=str(user_run / "cache"))
    assert data.labels.classes == ["negative", "positive"]  # sorted, although the first row is positive
    rows = reviews(64, seed=0)["label"]
    assert data.splits["train"].targets.tolist() == [["negative", "positive"].index(label) for label in rows]
    cfg = compose(["model=hf", f"model.pretrained={files / 'bert'}", "data=text",
                   f"data.train_path={files / 'train.csv'}", f"data.valid_path={files / 'val.csv'}"])
    assert type(build(cfg, cfg.seed).task) is ClassificationTask
    state = torch.load(user_run / "outputs/user/run/checkpoints/last.pt", weights_only=True)
    assert state["data"]["labels"] == {"text": ["text"], "target": "label", "classes": ["negative", "positive"]}


# 7. A datasets save_to_disk folder -------------------------------------------------------------
def test_a_saved_dataset_dict_folder_trains(compose, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict(reviews(48, seed=5)),
                 "validation": Dataset.from_dict(reviews(16, seed=6))}).save_to_disk(str(tmp_path / "reviews"))
    overrides = ["model=hf", BERT_KEYS, "data=text", f"data.train_path={tmp_path / 'reviews'}",
                 "data.batch_size=16", "trainer.max_steps=3", *QUIET]
    cfg = compose(overrides)
    parts = build(cfg, cfg.seed)
    assert {split: len(rows) for split, rows in parts.data.splits.items()} == {"train": 48, "val": 16}
    result = train_model(compose(overrides), run_dir=tmp_path / "run")
    assert result.global_step == 3 and "val/accuracy" in result.metrics


def test_a_saved_dataset_dict_with_train_and_test_only_takes_validation_rows_from_train(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict(reviews(40, seed=5)),
                 "test": Dataset.from_dict(reviews(10, seed=6))}).save_to_disk(str(tmp_path / "reviews"))
    data = TextData(train_path=str(tmp_path / "reviews"), target="label", val_fraction=0.25)
    assert {split: len(rows) for split, rows in data.splits.items()} == {"train": 30, "val": 10, "test": 10}
    with pytest.raises(ConfigError, match="gives the test rows already"):
        TextData(train_path=str(tmp_path / "reviews"), target="label", test_fraction=0.25)


# 8. Bad input ---------------------------------------------------------------------------------
def bad_inputs(files: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """(overrides, what the message must say) for each wrong input."""
    data = ["data=text", f"data.train_path={files / 'train.csv'}", f"data.valid_path={files / 'val.csv'}"]
    from_keys = ["model=hf", BERT_KEYS, *data]
    val = reviews(24, seed=1)
    val["label"][5] = "mixed"
    unseen = write_csv(val, tmp_path / "unseen.csv")
    return {
        "missing model folder": (["model=hf", f"model.pretrained={tmp_path / 'missing'}", *data],
                                 r"model.pretrained=.*missing: no such directory"),
        "config key typo": (["model=hf", "model.config={model_type: bert, hiden_size: 32}", *data],
                            r"model.config.hiden_size: .*did you mean hidden_size"),
        "head typo": ([*from_keys, "model.head=clasification"], r"model.head='clasification'.*did you mean classification"),
        "text column typo": ([*from_keys, "data.text=txt"], r"train.csv has no column 'txt'.*did you mean text"),
        "label only in val": ([*from_keys, f"data.valid_path={unseen}"],
                              r"unseen.csv: column 'label', row 6 holds the label 'mixed'"),
    }


@pytest.mark.parametrize("case", ["missing model folder", "config key typo", "head typo", "text column typo",
                                  "label only in val"])
def test_bad_input_is_a_config_error_naming_it(files, tmp_path, compose, case):
    from trainkit.commands.failures import explain

    overrides, message = bad_inputs(files, tmp_path)[case]
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=message) as error:
        build(cfg, cfg.seed)
    assert explain(error.value)[0] == 2


def test_bad_input_exits_2_from_the_command_line_without_a_traceback(files, cli, tmp_path):
    overrides, message = bad_inputs(files, tmp_path)["missing model folder"]
    out = cli("train", *overrides, "trainer.max_steps=1", env=OFFLINE)
    assert out.returncode == 2 and re.search(message, out.stderr), out.stderr[-3000:]
    assert "Traceback" not in out.stderr and not list(tmp_path.glob("outputs/*/*/checkpoints/*.pt"))


# 9. Sequence to sequence ------------------------------------------------------------------------
@pytest.mark.slow
def test_the_hf_translation_preset_trains_and_reports_bleu(compose, tmp_path):
    result = train_model(compose(["+experiment=nmt_hf_tiny", "data.max_pairs=64", "trainer.max_steps=4", *QUIET]),
                         run_dir=tmp_path / "run")
    assert result.global_step == 4 and 0.0 <= result.metrics["val/bleu"] <= 100.0


@pytest.mark.slow
def test_a_local_pretrained_bart_trains_and_translates_stdin(compose, cli, tmp_path):
    from trainkit.commands.export import plain_model
    from trainkit.commands.inference import translate_lines
    from trainkit.data.tokenizers import tokenizer_from_state

    model_dir = bart_dir(tmp_path / "bart", [text for pair in numbers_pairs(300) for text in pair])
    result = train_model(compose(["+experiment=nmt_hf_tiny", "model.config=null", f"model.pretrained={model_dir}",
                                  f"data.tokenizer={model_dir}", "data.max_pairs=64", "trainer.max_steps=4", *QUIET]),
                         run_dir=tmp_path / "run")
    assert "val/bleu" in result.metrics
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert state["data"]["tokenizer"]["kind"] == "hf" and json.loads(state["runtime"]["hf_config"])["d_model"] == 32
    lines = ["four hundred and two", "seventy-one", "nine thousand and six"]
    out = cli("translate", f"ckpt={result.last_checkpoint}", "beam=2", stdin="\n".join(lines) + "\n", env=OFFLINE)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.splitlines()
    assert len(printed) == len(lines)
    model = plain_model(result.last_checkpoint)[0]
    tokenizer = tokenizer_from_state(state["data"]["tokenizer"])
    assert printed == translate_lines(model, tokenizer, lines, beam=2, batch_size=64)


# 10. LoRA, gradient checkpointing, bf16 ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("head", ["kept", "new"])
def test_lora_on_a_pretrained_model_trains_only_adapters_and_its_checkpoint_evaluates(files, compose, tmp_path, head):
    # "new": the folder's head has 3 labels, the data 2, so the model gets a new head, trained whole.
    from trainkit.commands.inference import evaluate_checkpoint

    model_dir = files / "bert" if head == "kept" else bert_dir(tmp_path / "bert3", reviews(64, seed=0)["text"], 3)
    overrides = ["model=hf", f"model.pretrained={model_dir}", "data=text", f"data.train_path={files / 'train.csv'}",
                 f"data.valid_path={files / 'val.csv'}", "+finetune=lora", "finetune.targets=[query,value]",
                 "data.batch_size=16", "trainer.max_steps=4", "optimizer.lr=1e-2", *QUIET]
    whole = {"hf.classifier.weight", "hf.classifier.bias"}  # a classifier's head trains whole, new or kept
    cfg = compose(overrides)
    trainable = {name for name, p in build(cfg, cfg.seed).model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if re.search(r"\.(query|value)\.lora_[AB]$", name)}
    assert len(adapters) == 4 and trainable == adapters | whole, sorted(trainable)
    result = train_model(compose(overrides), run_dir=tmp_path / "run")
    weights = load_weights(result.last_checkpoint)
    assert set(weights) == adapters | whole | {"lora_base_fingerprint"}, sorted(weights)  # no frozen base weight
    assert any(weights[key].abs().sum() > 0 for key in adapters if key.endswith("lora_B"))  # B starts at zero
    metrics = evaluate_checkpoint(result.last_checkpoint, split="val")
    assert metrics["val/loss"] == pytest.approx(result.metrics["val/loss"], rel=1e-6)
    assert metrics["val/accuracy"] == result.metrics["val/accuracy"]
    if head == "new":  # export merges the adapters onto the folder's base and keeps the label names
        from transformers import AutoConfig

        from trainkit.commands.export import export_checkpoint

        export_checkpoint(result.last_checkpoint, "hf", tmp_path / "exported")
        assert AutoConfig.from_pretrained(tmp_path / "exported").id2label == {0: "negative", 1: "positive"}


def test_lora_with_default_targets_leaves_the_head_whole(files, compose):
    """finetune.targets=["*"] matches the classifier's Linear too: it must stay a plain, trainable
    layer (an adapter on a frozen random head would learn little and break the base fingerprint)."""
    from torch import nn

    cfg = compose(["model=hf", f"model.pretrained={files / 'bert'}", "data=text",
                   f"data.train_path={files / 'train.csv'}", f"data.valid_path={files / 'val.csv'}", "+finetune=lora"])
    model = build(cfg, cfg.seed).model
    assert type(model.hf.classifier) is nn.Linear and model.hf.classifier.weight.requires_grad
    assert "classifier" not in {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert sum(hasattr(m, "lora_A") for m in model.modules()) > 4  # the encoder's Linear layers are adapted


def test_a_pretrained_model_starts_in_training_mode(files):
    """from_pretrained hands back a model in eval mode; trainkit's must train with its dropout."""
    from trainkit.models.hf import HFModel

    model = HFModel(pretrained=str(files / "bert"), num_classes=2)
    assert all(module.training for module in model.modules())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(files):
    from trainkit.models.hf import HFModel

    data = text_data(files, tokenizer=str(files / "bert"), cache_dir=str(files / "cache"))
    inputs, targets = data.splits["train"][list(range(8))]
    outcomes = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = HFModel(pretrained=str(files / "bert"), gradient_checkpointing=checkpointing,
                        **data.runtime_kwargs()).train()
        hf = model.hf  # transformers 5 renamed is_gradient_checkpointing
        enabled = hf.is_activation_checkpointing if hasattr(type(hf), "is_activation_checkpointing") \
            else hf.is_gradient_checkpointing
        assert enabled is checkpointing
        torch.manual_seed(1)  # the same dropout masks
        loss = torch.nn.functional.cross_entropy(model(dict(inputs)), targets)
        loss.backward()
        outcomes.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = outcomes
    assert torch.equal(loss, loss_checkpointed)
    assert grads.keys() == grads_checkpointed.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=0, atol=1e-7, msg=name)


def test_bf16_run_finishes(files, compose, tmp_path):
    result = train_model(compose(["model=hf", f"model.pretrained={files / 'bert'}", "data=text",
                                  f"data.train_path={files / 'train.csv'}", f"data.valid_path={files / 'val.csv'}",
                                  "precision=bf16", "data.batch_size=16", "trainer.max_steps=2", *QUIET]),
                         run_dir=tmp_path / "run")
    assert result.global_step == 2 and np.isfinite(result.metrics["val/loss"])
