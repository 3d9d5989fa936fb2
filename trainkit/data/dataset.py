"""A user's own map-style ``torch.utils.data.Dataset`` per split (``data=dataset``).

Each split is a ``_target_`` node (``data.train._target_=mypkg.MyDataset`` with its own
arguments; ``val`` and ``test`` optional), built here by ``trainkit.core.builder.instantiate``,
so a misspelled argument is a ``ConfigError`` naming ``data.<split>.<key>``. The dataset is
indexed one sample at a time (``dataset[i]``) and batched by trainkit's own plans
(``FixedBatches`` as the loader's ``batch_sampler``): exact mid-epoch resume, training batches
sharded evenly over ranks, every evaluation sample seen by exactly one rank, and worker
processes, with no code from the user (resume is exact for a ``__getitem__`` that depends only
on its index). A class whose ``__init__`` takes ``split`` gets "train", "val" or "test" unless
the config sets it. This module never draws from the global RNG.

The training dataset may define ``runtime_kwargs() -> dict`` (``{"in_features": 64,
"out_features": 10, "num_classes": 10}``): those values are offered to the model, loss and
task, which take them where their signature has the name and the config does not set it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import default_collate as torch_default_collate

from trainkit.core.builder import HYDRA_KEYS, check_node, instantiate, resolve_target
from trainkit.core.errors import ConfigError, ConfigErrors
from trainkit.data.sampler import SplitLoading


def as_node(spec: Any, path: str, example: str) -> DictConfig | None:
    """A ``_target_`` mapping as a config node (Hydra hands it over as a plain dict); None for
    an absent one (null, or ``_target_: null`` with no arguments)."""
    if spec is None:
        return None
    if not isinstance(spec, (Mapping, DictConfig)) or "_target_" not in spec:
        raise ConfigError(f"{path}: expected {{_target_: {example}, ...its arguments}}, got {spec!r} "
                          f"(e.g. {path}._target_={example})")
    target = spec["_target_"]
    arguments = [str(key) for key in spec if key not in HYDRA_KEYS]
    if target == "???":  # Hydra's mark for a required value, handed over as text
        raise ConfigError(f"{path}._target_: required ({path}._target_={example}, its arguments as +{path}.KEY=VALUE)")
    if target is None and arguments:
        raise ConfigError(f"{path}: arguments ({', '.join(arguments)}) without a _target_; "
                          f"name the class with {path}._target_={example} or remove them")
    if target is None:
        return None
    return spec if isinstance(spec, DictConfig) else OmegaConf.create(dict(spec))


def build_dataset(spec: Any, split: str) -> Any:
    """One split's dataset from its ``_target_`` node (offered ``split=`` where its signature
    takes it), or a dataset object handed over from Python; checked to be map-style and not
    empty. None when the split names no dataset."""
    path = f"data.{split}"
    if spec is None or isinstance(spec, (Mapping, DictConfig)):
        node = as_node(spec, path, "mypkg.MyDataset")
        if node is None:
            return None
        dataset = instantiate(node, path, {"split": split})
        what = f"{path} ({node._target_})"
    else:
        dataset, what = spec, f"{path} ({type(spec).__name__})"
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ConfigError(f"{what}: not a map-style dataset (an IterableDataset or an object without "
                          "__getitem__); data=dataset needs __len__ and __getitem__(index) -> one sample")
    try:
        size = len(dataset)
    except TypeError:
        raise ConfigError(f"{what}: has no __len__; data=dataset needs a map-style dataset "
                          "(__len__ and __getitem__(index) -> one sample)") from None
    if size == 0:
        raise ConfigError(f"{what}: the dataset is empty (len() == 0); give it samples or remove {path}")
    return dataset


def build_collate(spec: Any) -> Callable[[list[Any]], Any]:
    """The function that turns a list of samples into a batch: torch's ``default_collate`` when
    no ``_target_`` is named; a class is built with its arguments (the instance is called); a
    function is used as it is, its arguments (if any) bound first."""
    path = "data.collate_fn"
    node = as_node(spec, path, "mypkg.collate")
    if node is None:
        return torch_default_collate
    target = resolve_target(node, path)
    if inspect.isclass(target):
        return instantiate(node, path)
    problems = check_node(node, path)
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    arguments = {key: value for key, value in OmegaConf.to_container(node, resolve=True).items()
                 if key not in HYDRA_KEYS}
    return functools.partial(target, **arguments) if arguments else target


def offered_by(dataset: Any) -> dict[str, Any]:
    """What the training dataset's optional ``runtime_kwargs()`` tells model, loss and task."""
    method = getattr(dataset, "runtime_kwargs", None)
    if method is None:
        return {}
    values = method()
    if not isinstance(values, Mapping) or not all(isinstance(key, str) for key in values):
        raise ConfigError(f"data.train: {type(dataset).__name__}.runtime_kwargs() must return a dict of "
                          f"argument names to values (got {values!r})")
    return dict(values)


class DatasetData:
    """Datasets named per split, each batched by a ``FixedBatches`` plan.

    ``train`` is required, ``val`` and ``test`` optional: each a ``_target_`` mapping (or, from
    Python, a dataset object; null or ``_target_: null``: no such split). ``collate_fn``: a
    ``_target_`` naming a function or class; without one, ``torch.utils.data.default_collate``.
    ``drop_last`` drops a last short training batch; evaluation batches never drop a sample. ``seed``, ``rank`` and ``world_size`` are
    runtime values from the run.
    """

    def __init__(self, train: Any = None, val: Any = None, test: Any = None, collate_fn: Any = None,
                 batch_size: int = 64, shuffle: bool = True, drop_last: bool = False, num_workers: int = 0,
                 pin_memory: bool | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        built = {split: build_dataset(spec, split) for split, spec in (("train", train), ("val", val), ("test", test))}
        self.splits = {split: dataset for split, dataset in built.items() if dataset is not None}
        if "train" not in self.splits:
            raise ConfigError("data.train._target_: required (data.train._target_=mypkg.MyDataset, its "
                              "arguments as +data.train.KEY=VALUE)")
        self.collate_fn = build_collate(collate_fn)
        self.runtime = offered_by(self.splits["train"])
        self.drop_last = drop_last
        self.loading = SplitLoading(batch_size, shuffle, num_workers, pin_memory, seed, rank, world_size)

    def runtime_kwargs(self) -> dict[str, Any]:
        """The training dataset's own ``runtime_kwargs()``, or nothing."""
        return dict(self.runtime)

    def loader(self, split: str) -> DataLoader | None:
        """A loader over one split (None if no dataset is named for it): the plan yields one
        list of indices per batch, the dataset one sample per index, ``collate_fn`` the batch."""
        dataset = self.splits.get(split)
        if dataset is None:
            return None
        return self.loading.fixed(dataset, split, self.drop_last, self.collate_fn)
