"""``model=hf``: a Hugging Face ``transformers`` model inside trainkit's loop.

The model comes from a local directory written by ``save_pretrained`` (``pretrained: DIR``,
read with ``local_files_only=True``: trainkit never downloads) or is built from a config
(``config: {model_type: bert, hidden_size: 64, ...}``; every key is checked against that model
type's config, a typo named with the closest valid key). ``head`` picks the class:

| head | class | forward returns |
|---|---|---|
| ``classification`` | ``AutoModelForSequenceClassification`` | logits ``[batch, num_labels]`` |
| ``seq2seq`` | ``AutoModelForSeq2SeqLM`` | logits ``[batch, target length, vocab]`` for ``(src, tgt_in)`` |
| ``causal_lm`` | ``AutoModelForCausalLM`` | logits ``[batch, length, vocab]`` |
| ``encoder`` | ``AutoModel`` | the mean of the last hidden states over real tokens ``[batch, hidden]`` |

Values the data knows reach the model as for every trainkit model: ``num_classes`` (or
``out_features`` for regression) sets ``num_labels``, ``class_names`` the label names,
``vocab_size`` (or ``src_vocab_size``) the vocabulary of a model built from a config (a
pretrained model's embeddings grow if its tokenizer has more ids), ``pad_id``/``bos_id``/
``eos_id`` the special ids (``bos_id`` is a seq2seq model's decoder start).

Called with keyword arguments (``task=model_loss``: a batch dict with ``labels``), the model
returns the ``transformers`` output itself, loss included. ``architecture()`` is the model's
config as JSON; checkpoints keep it (as ``hf_config``), so eval, translate and export rebuild
the trained model without its original directory, and never run code from it
(``trust_remote_code`` is never set).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.core.hf import check_directory, transformers_module

log = logging.getLogger("trainkit")
HEADS = {"classification": "AutoModelForSequenceClassification", "seq2seq": "AutoModelForSeq2SeqLM",
         "causal_lm": "AutoModelForCausalLM", "encoder": "AutoModel"}


def config_keys(model_type: Any) -> list[str] | None:
    """The keys a ``transformers`` config of ``model_type`` takes; None for an unknown type."""
    transformers = transformers_module()
    if model_type not in transformers.CONFIG_MAPPING:
        return None
    defaults = transformers.CONFIG_MAPPING[model_type]()
    return sorted(set(defaults.to_dict()) | set(getattr(defaults, "attribute_map", {})))


def config_from_keys(transformers: Any, keys: Mapping[str, Any]) -> Any:
    """A config of ``keys['model_type']`` with the other keys set; unknown keys are errors."""
    keys = dict(keys)
    model_type = keys.pop("model_type", None)
    valid = config_keys(model_type)
    if valid is None:
        known = sorted(transformers.CONFIG_MAPPING.keys())
        raise ConfigError(f"model.config.model_type={model_type!r}: not a transformers model type"
                          f"{did_you_mean(str(model_type), known)} (for example bert, bart, gpt2, t5)")
    for key in keys:
        if key not in valid:
            raise ConfigError(f"model.config.{key}: not a key of the {model_type} config"
                              f"{did_you_mean(key, valid)}")
    return transformers.AutoConfig.for_model(model_type, **keys)


def config_from_json(transformers: Any, text: str) -> Any:
    """The config stored in a checkpoint (a JSON string), checked like a user's keys."""
    try:
        keys = json.loads(text)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"checkpoint: its stored hf_config is not JSON: {error}") from None
    if not isinstance(keys, dict):
        raise ConfigError("checkpoint: its stored hf_config is not a JSON object")
    for key in ("auto_map", "custom_pipelines"):
        keys.pop(key, None)  # remote code is never run
    model_type = keys.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise ConfigError(f"checkpoint: its stored hf_config names model_type={model_type!r}, not a transformers type")
    return transformers.CONFIG_MAPPING[model_type].from_dict(keys)


class HFModel(nn.Module):
    """A ``transformers`` model with trainkit's calling conventions; see the module docstring.

    ``gradient_checkpointing`` recomputes each layer in backward (``transformers``' own,
    non-reentrant). ``hf_config`` is a checkpoint's stored config: the model is built from it
    (no weights read) and the checkpoint's weights are loaded afterwards.
    """

    def __init__(self, head: str = "classification", pretrained: str | None = None,
                 config: Mapping[str, Any] | None = None, gradient_checkpointing: bool = False,
                 num_classes: int | None = None, out_features: int | None = None,
                 class_names: list[str] | None = None, vocab_size: int | None = None,
                 src_vocab_size: int | None = None, pad_id: int | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, hf_config: str | None = None):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"model.head={head!r}: choose one of {', '.join(HEADS)}{did_you_mean(head, HEADS)}")
        if pretrained is None and config is None and hf_config is None:
            raise ConfigError("model=hf: set model.pretrained=DIR (a save_pretrained directory) or "
                              "model.config={model_type: ..., ...} to build one from a config")
        if pretrained is not None and config is not None:
            raise ConfigError("model=hf: set model.pretrained or model.config, not both")
        transformers = transformers_module()
        self.head, self.pad_id = head, pad_id
        self.pretrained_weights = pretrained is not None and hf_config is None  # a base LoRA may adapt
        labels = num_classes or (out_features if head == "classification" else None)
        values = data_values(labels, class_names, vocab_size or src_vocab_size, pad_id, bos_id, eos_id,
                             regression=num_classes is None and out_features is not None)
        auto = getattr(transformers, HEADS[head])
        fresh: list[str] = []  # weights the folder did not hold (a head for other labels)
        if hf_config is not None:
            self.hf = auto.from_config(config_from_json(transformers, hf_config))
        elif pretrained is not None:
            directory = check_directory(pretrained, "model.pretrained")
            self.hf, fresh = load_pretrained(transformers, auto, directory, values)
        else:
            built = config_from_keys(transformers, config)
            for key, value in values.items():
                setattr(built, key, value)
            self.hf = auto.from_config(built)
        pooler = getattr(self.hf, "pooler", None)
        if head == "encoder" and isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)  # the embedding is a mean over tokens; DDP needs every trained weight used
        if gradient_checkpointing:
            if not self.hf.supports_gradient_checkpointing:
                raise ConfigError(f"model.gradient_checkpointing: {type(self.hf).__name__} does not support it")
            enable = getattr(self.hf, "activation_checkpointing_enable", None)  # its name from transformers 5 on
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.pad_id is None:
            self.pad_id = self.hf.config.pad_token_id
        # What fine-tuning with adapters trains whole (finetune=lora): new weights and, for a
        # classifier, its head (a folder's head was made for other data, even at the same size).
        self.head_parameters = sorted(set(fresh) | set(head_names(self.hf) if head == "classification" else ()))
        self.train()  # from_pretrained returns the model in eval mode: dropout would stay off in training

    @property
    def max_len(self) -> int:
        """The longest input the model takes (its position embeddings), for translate."""
        config = self.hf.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096)

    @property
    def d_model(self) -> int | None:
        config = self.hf.config
        return getattr(config, "d_model", None) or getattr(config, "hidden_size", None)

    def architecture(self) -> str:
        """The model's config as JSON (no weights), stored in checkpoints as ``hf_config``."""
        return self.hf.config.to_json_string(use_diff=False)

    def fsdp_blocks(self) -> list[nn.Module]:
        """The units FSDP shards one at a time: the modules the library says not to split
        (``_no_split_modules``: its layers); ``distributed.fsdp_wrap`` names others."""
        names = set(getattr(self.hf, "_no_split_modules", None) or ())
        # by the class or a base: once sharded, a layer's class is FSDP's subclass (FSDPBartEncoderLayer)
        return [module for module in self.hf.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]

    def runtime_state(self) -> dict[str, Any]:
        """Plain values a checkpoint keeps to rebuild this model without its directory."""
        return {"hf_config": self.architecture()}

    def forward(self, inputs: Any = None, tgt_in: Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs:  # task=model_loss: the batch as keywords, the library's output (with its loss)
            return self.hf(**({"input_ids": inputs} if inputs is not None else {}), **kwargs)
        if self.head == "seq2seq":
            # No decoder mask: the decoder is causal, padded targets are ignored by the loss, and a
            # decoder start id equal to the pad id (T5, Marian) must stay visible.
            return self.hf(input_ids=inputs, attention_mask=self.mask(inputs), decoder_input_ids=tgt_in).logits
        if isinstance(inputs, Tensor):
            inputs = {"input_ids": inputs, "attention_mask": self.mask(inputs)}
        output = self.hf(**inputs)
        if self.head != "encoder":
            return output.logits
        mask = inputs["attention_mask"].unsqueeze(-1).to(output.last_hidden_state.dtype)
        return (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)

    def mask(self, ids: Tensor) -> Tensor:
        return ids.ne(self.pad_id) if self.pad_id is not None else torch.ones_like(ids, dtype=torch.bool)

    @torch.no_grad()
    def generate_ids(self, src: Tensor, bos_id: int, eos_id: int, beam_size: int, max_len: int,
                     length_penalty: float = 1.0) -> list[list[int]]:
        """Greedy (``beam_size`` 1) or beam-search outputs of ``transformers``' ``generate``: one
        id list per source row, without the decoder start and cut before the first EOS."""
        from transformers import GenerationConfig

        # Only trainkit's options: a folder's generation_config.json (no_repeat_ngram_size, forced
        # tokens, min_length) is not in checkpoints, so validation and translate could differ.
        config = GenerationConfig(num_beams=beam_size, max_new_tokens=max_len, length_penalty=length_penalty,
                                  do_sample=False, early_stopping=beam_size > 1, decoder_start_token_id=bos_id,
                                  bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=self.pad_id)
        # synced_gpus=False: under FSDP transformers would all-reduce at every new token, but trainkit
        # decodes with the parameters gathered (core.sharding.gathered), where ranks decode different
        # numbers of batches: a collective there mismatches and aborts the run.
        out = self.hf.generate(input_ids=src, attention_mask=self.mask(src), generation_config=config,
                               synced_gpus=False)
        rows = []
        for row in out[:, 1:].tolist():
            rows.append(row[: row.index(eos_id)] if eos_id in row else row)
        return rows

    def save_pretrained(self, directory: str | Path) -> None:
        """The model as ``transformers`` writes it (``from_pretrained(directory)`` loads it)."""
        self.hf.save_pretrained(str(directory))


def head_names(model: Any) -> list[str]:
    """Parameters of a task model outside its base model (the head), as ``HFModel`` names them."""
    base = getattr(model, "base_model", model)
    inside = {id(parameter) for parameter in base.parameters()} if base is not model else set()
    return [f"hf.{name}" for name, parameter in model.named_parameters() if id(parameter) not in inside]


def data_values(labels: int | None, class_names: list[str] | None, vocab_size: int | None, pad_id: int | None,
                bos_id: int | None, eos_id: int | None, regression: bool) -> dict[str, Any]:
    """The config attributes the data decides."""
    values: dict[str, Any] = {}
    if labels is not None:
        values["num_labels"] = int(labels)
        if class_names is not None and len(class_names) == labels:
            values["id2label"] = {i: str(name) for i, name in enumerate(class_names)}
            values["label2id"] = {str(name): i for i, name in enumerate(class_names)}
        values["problem_type"] = "regression" if regression else "single_label_classification"
    if vocab_size is not None:
        values["vocab_size"] = int(vocab_size)
    for key, value in (("pad_token_id", pad_id), ("bos_token_id", bos_id), ("eos_token_id", eos_id),
                       ("decoder_start_token_id", bos_id)):
        if value is not None:
            values[key] = int(value)
    return values


def load_pretrained(transformers: Any, auto: Any, directory: Path, values: dict[str, Any]) -> tuple[Any, list[str]]:
    """A ``save_pretrained`` directory, offline; a new classification head where ``num_labels``
    differs from the stored one; embeddings grown where the tokenizer has more ids. Returns the
    model and the names (as parameters of ``HFModel``) of the weights the folder did not hold."""
    vocab_size = values.pop("vocab_size", None)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        for key, value in values.items():
            setattr(config, key, value)
        model, info = auto.from_pretrained(directory, config=config, local_files_only=True, trust_remote_code=False,
                                           ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as error:  # safetensors, unpickling and config errors come in many types
        text = " ".join(str(error).split())[:300]
        raise ConfigError(f"model.pretrained={directory}: cannot be loaded as {auto.__name__}: {text}") from None
    embeddings = model.get_input_embeddings()
    if vocab_size is not None and embeddings is not None and vocab_size > embeddings.num_embeddings:
        log.info("model.pretrained: embeddings grown from %d to the tokenizer's %d ids",
                 embeddings.num_embeddings, vocab_size)
        model.resize_token_embeddings(vocab_size)
    fresh = [*info.get("missing_keys", ()), *(key[0] for key in info.get("mismatched_keys", ()))]
    return model, sorted(f"hf.{name}" for name in fresh)
