"""The dry forward: the task's loss on a few training samples, once, at build time.

A loss that does not fit the task's outputs, or a model that does not fit the data, shows up
here as one ``ConfigError`` naming the groups involved, the shapes seen and what to do, instead
of a traceback at the first step or a loss that silently broadcasts into nonsense.
``check_fit`` runs at the end of ``trainkit.run.build.build``: in every run, on every rank, and in
``trainkit validate``. It costs one forward on ``SAMPLES`` samples (milliseconds on the presets).

Never: change anything the run depends on. Every RNG (python, numpy, torch CPU and CUDA) is put
back, each submodule's training flag is restored, the model runs in eval mode without gradients
(no dropout draws, no batch-norm statistics), hooks are removed, and the samples are read from
the dataset through the sampler of a fresh loader, without iterating any loader (batch plans
and epochs stay untouched). Only errors raised by the forward become a ``ConfigError``; a
``ConfigError`` raised inside passes unchanged, a ``KeyboardInterrupt`` passes through.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from trainkit.core.devices import eval_mode, move_to
from trainkit.core.errors import ConfigError
from trainkit.core.precision import cast_floating
from trainkit.data.sampler import BatchPlan

SAMPLES = 4  # samples in the dry forward's batch
# torch's own warning when mse_loss, l1_loss, ... are about to broadcast mismatched shapes.
BROADCAST = r"Using a target size .* that is different to the input size"
CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def check_fit(cfg: Any, data: Any, model: nn.Module, task: Any) -> None:
    """Run the task's loss once on the first few training samples; raise one ``ConfigError``
    explaining a mismatch between data, model, loss and task. No-op for data without a
    map-style training loader (nothing can be read without consuming it)."""
    with rng_preserved():  # a shuffling sampler or the dataset may draw too
        batch = tiny_batch(data.loader("train"), SAMPLES)
        if batch is None:
            return
        parameter = next(model.parameters(), None)
        if parameter is not None and parameter.device.type != "cpu":  # a model that placed itself
            batch = move_to(batch, parameter.device)
        if parameter is not None and parameter.dtype == torch.float64:  # FSDP converts before it shards (fp64)
            batch = cast_floating(batch, torch.float64)
        with eval_mode(model), torch.no_grad(), recording(model, task) as seen:
            try:
                problem = dry_forward(model, task, batch)
            except ConfigError:
                raise
            except Exception as error:  # whatever the forward raises is a mismatch to explain
                problem = ("loss" if "output" in seen else "model", reason(error))
    problem = misfit(task, seen) or problem  # a clearer cause than what the loss raised, if seen
    if problem is not None:
        raise ConfigError(explain(cfg, data, task, batch, seen, *problem))


def tiny_batch(loader: Any, size: int) -> Any:
    """``size`` samples batched as the loader batches them (the first ones of its first batch,
    or of the dataset for trainkit's batch plans), without iterating the loader."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if loader.batch_sampler is not None:  # a sampler of indices, batched by the loader
        rows = next(iter(loader.batch_sampler), [])[:size]
        return loader.collate_fn([loader.dataset[row] for row in rows]) if rows else None
    if isinstance(loader.sampler, BatchPlan):  # any rows make a batch: skip planning the epoch (~0.1 s)
        rows = list(range(min(size, len(loader.dataset))))
        return loader.collate_fn(loader.dataset[rows]) if rows else None
    first = next(iter(loader.sampler), None)  # another sampler of whole batches (or of single samples)
    if first is None:
        return None
    return loader.collate_fn(loader.dataset[first[:size] if isinstance(first, list) else first])


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Put the python, numpy, torch and (when initialised) CUDA RNGs back on the way out."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextmanager
def recording(model: nn.Module, task: Any) -> Iterator[dict[str, Any]]:
    """Record the model's output and the arguments of a ``torch.nn`` loss, for the message."""
    seen: dict[str, Any] = {}
    hooks = [model.register_forward_hook(lambda module, args, output: seen.update(output=output))]
    loss_fn = getattr(task, "loss_fn", None)
    if isinstance(loss_fn, nn.Module):
        hooks.append(loss_fn.register_forward_pre_hook(lambda module, args: seen.update(loss_args=args)))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def dry_forward(model: nn.Module, task: Any, batch: Any) -> tuple[str, str] | None:
    """Count the batch and compute the task's loss; a loss that is not one number is a problem
    of the ``loss`` (see ``misfit`` for the form of a problem)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=BROADCAST)
        loss, _ = task.loss_sum(model, batch)
        task.count(batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        return "loss", f"the loss is {describe(loss)}, not one number (a loss must be summed over the batch)"
    return None


def misfit(task: Any, seen: dict[str, Any]) -> tuple[str, str] | None:
    """A mismatch torch does not (or not clearly) report, from what the forward recorded:
    (``model`` or ``loss``, the side that does not fit its neighbour; why), or None."""
    from trainkit.tasks.supervised import ClassificationTask

    output, loss_args = seen.get("output"), seen.get("loss_args")
    if isinstance(task, ClassificationTask) and isinstance(output, Tensor) and output.ndim == 2 \
            and output.shape[1] != task.num_classes:
        return "model", f"{output.shape[1]} scores per sample for the data's {task.num_classes} classes"
    if loss_args and isinstance(task.loss_fn, CLASS_LOSSES) and loss_args[0].ndim >= 2 and loss_args[0].shape[1] == 1:
        return "loss", "a cross-entropy over one class is always 0"
    return None


def reason(error: Exception) -> str:
    """One line from an exception of the forward."""
    if isinstance(error, UserWarning) and "different to the input size" in str(error):
        return "their shapes differ, and the loss would broadcast them into a wrong value"
    text = " ".join(str(error).split()).rstrip(".")
    return f"{type(error).__name__}: {text[:300]}{' ...' if len(text) > 300 else ''}"


def describe(value: Any) -> str:
    """Shapes and dtypes, e.g. ``[4, 10] float32`` or ``{src: [4, 9] int64, ...}``."""
    if isinstance(value, Tensor):
        kind = " (class ids)" if not value.is_floating_point() and value.ndim == 1 else ""
        return f"[{', '.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')}{kind}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {describe(item)}" for key, item in value.items()) + "}"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return f"{type(value).__name__}(" + ", ".join(f"{name} {describe(item)}" for name, item in
                                                    zip(value._fields, value)) + ")"
    if isinstance(value, (tuple, list)) and any(isinstance(item, Tensor) for item in value):
        return "(" + ", ".join(describe(item) for item in value) + ")"
    if isinstance(value, (tuple, list)):
        return f"a list of {len(value)}"
    return type(value).__name__


def option(cfg: Any, group: str) -> str:
    """How a user names a group's choice: ``loss=mse``; ``loss._target_=...`` for one that is
    not a shipped option; ``loss=null`` for none."""
    import importlib.resources

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    node = cfg.get(group)
    if node is None:
        return f"{group}=null"
    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices.get(group)
        if chosen:
            return f"{group}={chosen}"
    target = node.get("_target_")
    try:
        shipped = (importlib.resources.files("trainkit.conf") / group).iterdir()
    except ModuleNotFoundError:  # a source tree without the installed package's conf mapping
        shipped = iter(())
    # Options sharing a target (data=digits, data=diabetes) are told apart by their other values.
    scored = []
    for file in shipped:
        if file.name.endswith(".yaml"):
            values = OmegaConf.to_container(OmegaConf.create(file.read_text()))
            if values.get("_target_") == target:
                same = sum(key in node and node.get(key) == value for key, value in values.items())
                scored.append((same, file.name.removesuffix(".yaml")))
    return f"{group}={max(scored)[1]}" if scored else f"{group}._target_={target}"


def advice(cfg: Any, data: Any, task: Any) -> str:
    """What to do: keys set where the data offers a value, and the usual loss for the task."""
    from trainkit.tasks.base import ModelLossTask
    from trainkit.tasks.seq2seq import Seq2SeqTask
    from trainkit.tasks.supervised import ClassificationTask, RegressionTask

    offered = {key: value for key, value in data.runtime_kwargs().items()
               if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
    hints = [f"{group}.{key}={cfg[group][key]} replaces the data's {value} (~{group}.{key} takes the data's)"
             for group in ("model", "loss", "task") if cfg.get(group) is not None
             for key, value in offered.items() if key in cfg[group] and cfg[group][key] != value]
    loss_fn = getattr(task, "loss_fn", None)
    if isinstance(task, ModelLossTask):
        hints.append("task=model_loss calls the model with the whole batch and reads the loss from its output; "
                     "a model without its own loss needs a loss and a task (e.g. loss=cross_entropy task=classification)")
    elif getattr(loss_fn, "teacher_ckpt", None):
        hints.append(f"the student must also give the outputs of the teacher in loss.teacher_ckpt={loss_fn.teacher_ckpt}")
    elif isinstance(task, ClassificationTask) and not isinstance(loss_fn, CLASS_LOSSES):
        hints.append("use loss=cross_entropy (or task=regression for real-valued targets)")
    elif isinstance(task, Seq2SeqTask) and not isinstance(loss_fn, CLASS_LOSSES):
        hints.append("use loss=cross_entropy (a translation model gives logits over the vocabulary)")
    elif isinstance(task, RegressionTask) and "num_classes" in offered:
        hints.append("the data's targets are class ids: use task=classification loss=cross_entropy")
    elif isinstance(task, RegressionTask) and isinstance(loss_fn, CLASS_LOSSES):
        hints.append("use loss=mse (or task=classification for class labels)")
    return "; ".join(hints) or ("pick model, loss and task options that belong together "
                                "(`trainkit train ... --cfg job` shows the composed config)")


def explain(cfg: Any, data: Any, task: Any, batch: Any, seen: dict[str, Any], blame: str, problem: str) -> str:
    """The one message: which groups do not fit, what was seen, why, and what to do."""
    if blame == "model":
        names = f"{option(cfg, 'model')} does not fit {option(cfg, 'data')}"
    elif cfg.get("loss") is not None:
        names = f"{option(cfg, 'loss')} does not fit {option(cfg, 'task')}"
    else:
        names = f"{option(cfg, 'task')} does not fit {option(cfg, 'model')}"
    if "output" not in seen:  # the model's own forward failed
        return f"{names}: the model's forward on a batch of {describe(batch)} failed: {problem}; {advice(cfg, data, task)}"
    loss_args = seen.get("loss_args")
    targets = (f"the targets are {describe(loss_args[1])}" if loss_args and len(loss_args) > 1
               else f"the batch is {describe(batch)}")
    return f"{names}: the model gives {describe(seen['output'])} and {targets}: {problem}; {advice(cfg, data, task)}"
