"""LoRA fine-tuning (Hu et al. 2021) and ``init_from``: start from a trainkit checkpoint.

``apply_finetune(cfg, model, data)`` is the one call ``trainkit.run.build`` makes after the
model is built: it loads the weights of ``init_from=PATH`` (weights only: the optimizer,
schedule and step count start fresh, unlike ``resume``), and with ``+finetune=lora`` freezes
every parameter and wraps the matching ``nn.Linear`` layers in :class:`LoRALinear`, whose
output is ``W x + b + (alpha / rank) * B A dropout(x)`` with ``B`` starting at zero, so the
adapted model starts out equal to the loaded one.

Checkpoints of a LoRA model hold the adapters only: the model's ``state_dict()`` leaves out
frozen parameters (the base comes back from ``init_from`` when the run is resumed, evaluated
or merged), plus a SHA-256 fingerprint of the frozen base that refuses adapters whose base
file has changed since. :func:`merge_lora` folds the adapters into plain ``nn.Linear``
weights (``trainkit export format=merged`` writes that as a plain checkpoint).

Never: read a checkpoint other than through ``trainkit.core.checkpoint.read_checkpoint`` (weights
only, its stored config checked against the user's trust list), or adapt a layer whose
weight is tied to another (merging would change the embedding too).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainkit.core.errors import ConfigError, did_you_mean

log = logging.getLogger("trainkit")
FINGERPRINT = "lora_base_fingerprint"  # a buffer on the adapted model: SHA-256 of the frozen base
OPTIONS = {"method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["*"], "trainable": []}


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / rank) * B @ A``.

    ``A`` ([rank, in]) starts like a Linear weight (Kaiming uniform), ``B`` ([out, rank]) at
    zero, so at the start the output equals the base layer's exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (in eval mode)."""
        base = self.base
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(base.weight + self.scaling * (self.lora_B @ self.lora_A))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


# Adapting and merging ---------------------------------------------------------------------------
def matches(name: str, patterns: Sequence[str]) -> bool:
    """A module name matches a pattern by its full dotted name or its last part (fnmatch)."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in patterns)


def held_by(name: str, patterns: Sequence[str]) -> bool:
    """A parameter matches by its own name or that of any module holding it (``classifier``
    matches ``hf.classifier.weight``)."""
    parts = name.split(".")
    return any(matches(".".join(parts[:end]), patterns) for end in range(1, len(parts) + 1))


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] = ("*",), trainable: Sequence[str] = ()) -> int:
    """Freeze ``model`` and wrap every ``nn.Linear`` whose name matches ``targets`` in a
    :class:`LoRALinear`, in place; returns how many layers were adapted. Parameters matching
    ``trainable`` (and those the model reports as ``head_parameters``: a Hugging Face model's
    head) stay trainable whole, without adapters, and are saved with them."""
    tied = tied_parameters(model)
    keep = [*trainable, *getattr(model, "head_parameters", ())]
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and name
               and not any(held_by(f"{name}.{own}", keep) for own, _ in module.named_parameters())]
    chosen = [(name, module) for name, module in linears if matches(name, targets)]
    skipped = [name for name, module in chosen if id(module.weight) in tied]
    if skipped:  # merging an update into a tied weight would change the embedding too
        log.info("LoRA: leaving out %s (weight tied to an embedding)", ", ".join(skipped))
    chosen = [(name, module) for name, module in chosen if name not in skipped]
    if not chosen:
        names = [name for name, _ in linears]
        raise ConfigError(f"finetune.targets={list(targets)}: matches no untied nn.Linear of the model "
                          f"(its Linear layers: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''})")
    model.requires_grad_(False)
    kept = [name for name, _ in model.named_parameters() if held_by(name, keep)]
    if trainable and not kept:
        raise ConfigError(f"finetune.trainable={list(trainable)}: matches no parameter of the model")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in kept)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha, dropout))
    model.register_buffer(FINGERPRINT, base_fingerprint(model))
    model._lora_hooks = [  # removed again by merge_lora
        model.register_state_dict_post_hook(drop_frozen),
        model.register_load_state_dict_pre_hook(check_fingerprint),
        model.register_load_state_dict_post_hook(allow_frozen_missing),
    ]
    return len(chosen)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into a plain ``nn.Linear`` in place, unfreeze the model and drop the
    LoRA checkpoint hooks; returns how many layers were merged."""
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name, module in adapted:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.merged())
    for handle in getattr(model, "_lora_hooks", []):
        handle.remove()
    model._lora_hooks = []
    model._buffers.pop(FINGERPRINT, None)
    model.requires_grad_(True)
    return len(adapted)


def base_fingerprint(model: nn.Module) -> torch.Tensor:
    """SHA-256 of the frozen parameters' names and bytes, as 32 uint8 values."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)


def frozen_names(module: nn.Module, prefix: str) -> set[str]:
    return {prefix + name for name, parameter in module.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad}


def drop_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict post hook: checkpoints keep adapters and buffers, not the frozen base."""
    for name in frozen_names(module, prefix):
        state_dict.pop(name, None)


def allow_frozen_missing(module: nn.Module, incompatible: Any) -> None:
    """load_state_dict post hook: an adapter-only state dict loads strictly."""
    frozen = frozen_names(module, "")
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


def check_fingerprint(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                      strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                      error_msgs: list[str]) -> None:
    """load_state_dict pre hook: adapters trained on another base are refused."""
    saved = state_dict.get(prefix + FINGERPRINT)
    own = getattr(module, FINGERPRINT, None)
    if saved is not None and own is not None and not torch.equal(saved.cpu(), own.cpu()):
        raise ConfigError("these LoRA adapters were trained on other base weights than the init_from "
                          "checkpoint holds now (its file changed since); point init_from at the original")


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), each tied parameter counted once."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


# The build step ---------------------------------------------------------------------------------
def finetune_options(node: Any) -> dict[str, Any]:
    """The ``finetune`` group as checked plain values (every problem names its key)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, (dict, DictConfig)):
        raise ConfigError(f"finetune={node!r}: pick a method with +finetune=lora")
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    for key in values:
        if key not in OPTIONS:
            raise ConfigError(f"finetune.{key}: unknown key{did_you_mean(str(key), OPTIONS, 'finetune.')}")
    options = {**OPTIONS, **values}
    if options["method"] != "lora":
        raise ConfigError(f"finetune.method={options['method']!r}: the only method is lora")
    rank, alpha, dropout, targets = options["rank"], options["alpha"], options["dropout"], options["targets"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"finetune.rank={rank!r}: must be a positive integer")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"finetune.alpha={alpha!r}: must be a positive number")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"finetune.dropout={dropout!r}: must be in [0, 1)")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"finetune.targets={targets!r}: must be a list of module name patterns")
    trainable = options["trainable"]
    if isinstance(trainable, str):
        trainable = [trainable]
    if not all(isinstance(t, str) and t for t in trainable):
        raise ConfigError(f"finetune.trainable={trainable!r}: must be a list of parameter name patterns")
    return {"rank": rank, "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets),
            "trainable": list(trainable)}


def load_initial_weights(model: nn.Module, path: str, data: Any = None, trust: Sequence[str] = ()) -> None:
    """Load the model weights of a trainkit checkpoint (``init_from``), weights only; its
    stored config must be trusted under ``trust`` (``trainkit.core.builder.check_trusted``)."""
    from trainkit.core.checkpoint import load_weights, read_checkpoint

    try:
        state, saved = read_checkpoint(path, trust)
    except ConfigError as error:
        raise ConfigError(f"init_from={path}: {error}") from None
    if not isinstance(state.get("model"), dict):
        raise ConfigError(f"init_from={path}: not a trainkit checkpoint (no 'model' weights)")
    if saved.get("finetune") is not None:
        raise ConfigError(f"init_from={path}: holds LoRA adapters only; merge them into a plain checkpoint "
                          f"first (trainkit export ckpt={path} format=merged) and start from that")
    ours = (data.state_dict() if hasattr(data, "state_dict") else {}).get("tokenizer")
    theirs = (state.get("data") or {}).get("tokenizer")
    if ours is not None and theirs is not None and ours != theirs:
        raise ConfigError(f"init_from={path}: its tokenizer differs from the one built for this run's data "
                          "(other data or data.vocab_size/tokenizer settings), so token ids would change meaning")
    load_weights(model, state["model"], f"init_from={path}")


def apply_finetune(cfg: Any, model: nn.Module, data: Any = None) -> nn.Module:
    """``init_from`` weights, then ``finetune`` adapters; the model unchanged when neither is set.
    The ``init_from`` checkpoint is checked against ``cfg.trust`` (the user's list: a run's own,
    or the command line's for a config read from a checkpoint)."""
    from trainkit.core.builder import parse_trust

    init_from, finetune = cfg.get("init_from"), cfg.get("finetune")
    options = finetune_options(finetune) if finetune is not None else None
    if options is not None and not init_from and not getattr(model, "pretrained_weights", False):
        raise ConfigError("+finetune=lora needs init_from=PATH: the trainkit checkpoint whose weights "
                          "the adapters fine-tune (adapters on random weights learn little), or "
                          "model=hf with model.pretrained=DIR")
    if init_from:
        load_initial_weights(model, str(init_from), data, parse_trust(cfg.get("trust")))
        log.info("init_from: weights of %s", init_from)
    if options is None:
        return model
    count = apply_lora(model, **options)
    trainable, total = trainable_summary(model)
    log.info("LoRA rank %d alpha %g on %d layers: %s trainable of %s parameters (%.2f%%)", options["rank"],
             options["alpha"], count, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model
