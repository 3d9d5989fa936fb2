"""The only place that turns config into objects.

Every group that names a ``_target_`` is checked against the target's signature before it
is built: an unknown key is reported with the closest valid name, a missing required
argument by name. Runtime values (the data's vocabulary size, the model's ``d_model``, the
run's total steps, the pad id) are offered to every target and passed only where its
signature accepts them and the config does not set them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainkit.core.errors import ConfigError, ConfigErrors, did_you_mean

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# What a config read from a checkpoint may build without the user's say-so: classes of
# trainkit's component modules, torch.nn and torch.optim. Not trainkit.core.checkpoint, .export,
# .train, .logs, ...: those read and write files.
COMPONENTS = ("trainkit.models", "trainkit.data", "trainkit.tasks", "trainkit.losses", "trainkit.schedulers",
              "trainkit.callbacks", "trainkit.metrics", "trainkit.techniques.distill", "trainkit.techniques.curriculum",
              "trainkit.distill", "trainkit.curriculum",  # their paths before the layered package (trainkit.MOVED)
              "torch.nn", "torch.optim")
DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
# The user's trust list while a config is built (``trust`` of the run, or of the eval/export/
# translate command line): a distillation teacher loaded inside the build checks its own
# stored config against it. Never taken from a stored config.
TRUST: ContextVar[tuple[str, ...]] = ContextVar("trainkit_trust", default=())


def resolve_target(node: Any, path: str) -> Any:
    """Import the object a ``_target_`` names, or explain why it cannot be."""
    from hydra.utils import get_object

    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{path}: needs a _target_ naming a class or function (got {node!r})")
    target = node._target_
    try:
        return get_object(target)
    except Exception as error:  # import errors of user modules come in many types
        cause = error.__cause__ or error
        raise ConfigError(f"{path}._target_={target!r} cannot be imported: {cause}") from None


def accepted(obj: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of a callable and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return {}, True
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    return named, takes_any


def check_node(node: Any, path: str, runtime: dict[str, Any] | None = None) -> list[ConfigError]:
    """Every problem of one ``_target_`` node: import, unknown keys, and (when the runtime
    values are known) missing arguments."""
    try:
        target = resolve_target(node, path)
    except ConfigError as error:
        return [error]
    params, takes_any = accepted(target)
    problems = []
    if not takes_any:
        for key in node:
            if key not in HYDRA_KEYS and key not in params:
                hint = did_you_mean(str(key), params, f"{path}.") or (
                    f" (left over from another {path} option? remove it with ~{path}.{key})")
                problems.append(ConfigError(f"{path}.{key}: not an argument of {node._target_}{hint}"))
    for name, param in params.items() if runtime is not None else ():
        if param.default is inspect.Parameter.empty and name not in node and name not in runtime:
            problems.append(ConfigError(f"{path}: {node._target_} needs the argument {name!r} ({path}.{name}=...)"))
    return problems


def instantiate(node: Any, path: str, runtime: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """Build a ``_target_`` node; ``fixed`` arguments always apply, ``runtime`` ones fill gaps."""
    from hydra.utils import instantiate as hydra_instantiate

    problems = check_node(node, path, {**(runtime or {}), **fixed})
    if problems:
        raise ConfigErrors(problems) if len(problems) > 1 else problems[0]
    params, takes_any = accepted(resolve_target(node, path))
    offered = {k: v for k, v in (runtime or {}).items() if k not in node and (takes_any or k in params)}
    try:
        # _partial_: runtime objects (parameters, modules) go straight to the call and are
        # never copied into the config.
        factory = hydra_instantiate(node, _partial_=True, _convert_="all")
        return factory(**offered, **fixed)
    except ConfigError:
        raise
    except Exception as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"{path}: {node._target_} rejected its arguments: {cause}") from None


# Trust: what a checkpoint's stored config may build --------------------------------------------
def under(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of ``prefixes`` or inside one, on module boundaries (``trainkit`` covers
    ``trainkit.x``, never ``trainkitevil.x``)."""
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def parse_trust(value: Any, key: str = "trust") -> tuple[str, ...]:
    """Module prefixes from a list or a command-line value (``[mypkg,other]`` or ``mypkg``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        value = [part.strip().strip("'\"") for part in text.split(",")] if text.strip() else []
    if value is None:
        return ()
    if not isinstance(value, (list, tuple, ListConfig)):
        raise ConfigError(f"{key}={value!r}: expected a list of module prefixes, e.g. {key}=[mypkg]")
    prefixes = tuple(str(prefix) for prefix in value)
    for prefix in prefixes:
        if not DOTTED.match(prefix):
            raise ConfigError(f"{key}: {prefix!r} is not a module prefix (dotted names, e.g. {key}=[mypkg,other.models])")
    return prefixes


@contextmanager
def trusting(prefixes: Iterable[str]) -> Iterator[None]:
    """Within the block, checkpoints read while building (a teacher) trust ``prefixes``."""
    token = TRUST.set(tuple(prefixes))
    try:
        yield
    finally:
        TRUST.reset(token)


def check_trusted(cfg: Any, source: str, trust: Sequence[str] = ()) -> None:
    """Refuse a config read from ``source`` (a checkpoint) unless every ``_target_`` in it, at
    any depth (dicts, lists, ``_args_``, loss terms, callbacks), is allowed: a class of
    trainkit's components, ``torch.nn`` or ``torch.optim``, or anything under a prefix in
    ``trust``. The string is checked before anything is imported (an import can run code);
    then the object it resolves to must itself live under an allowed module, so attribute
    traversal (``torch.nn.functional.torch.load``) gets nowhere. Interpolations are refused:
    a stored config is resolved when written, and a resolver could read the environment or
    make new nodes after this check. Raises ``ConfigError`` naming the key and the target."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    for key, target in stored_targets(tree, "", source):
        check_target(target, key, source, tuple(trust))


def stored_targets(node: Any, key: str, source: str) -> Iterator[tuple[str, Any]]:
    """(key, ``_target_`` value) of every node in a plain config tree, depth first."""
    if isinstance(node, dict):
        if node.get("_target_") is not None:  # null builds nothing (data=dataset's absent splits)
            yield key, node["_target_"]
        for name, child in node.items():
            yield from stored_targets(child, f"{key}.{name}" if key else str(name), source)
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from stored_targets(child, f"{key}[{index}]", source)
    elif isinstance(node, str) and "${" in node:
        raise ConfigError(f"checkpoint {source}: its stored config holds an interpolation at {key} ({node[:80]}); "
                          "trainkit stores configs resolved, so this one was edited: refusing it")


def check_target(target: Any, key: str, source: str, trust: tuple[str, ...]) -> None:
    where = f"checkpoint {source}: its stored config names {key + '.' if key else ''}_target_={target}"
    if not isinstance(target, str) or not DOTTED.match(target):
        raise ConfigError(f"{where}, which is not a dotted import path; refusing the checkpoint")
    if not under(target, COMPONENTS + trust):
        raise ConfigError(f"{where}, which is not trusted ({allowed_text(trust)}); "
                          f"if you trust this checkpoint, add trust=[{trust_hint(target.rpartition('.')[0] or target)}] "
                          "to the command line")
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as error:  # import errors of user modules come in many types
        raise ConfigError(f"{where}, which cannot be imported: {error.__cause__ or error}") from None
    modules = defining_modules(obj)
    allowed = COMPONENTS + trust if inspect.isclass(obj) else trust  # functions only where trusted
    if not modules or not all(module and under(module, allowed) for module in modules):
        what = describe(obj)
        hint = trust_hint(next((m for m in modules if m and not under(m, allowed)), target.rpartition(".")[0]))
        raise ConfigError(f"{where}, which resolves to {what}: not trusted ({allowed_text(trust)}); "
                          f"if you trust this checkpoint, add trust=[{hint}] to the command line")


def defining_modules(obj: Any) -> list[str | None]:
    """The modules an object comes from: a class's or function's own, plus for a bound method
    its owner's. Empty for anything that is not a class or a function (an instance, a module)."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return [obj.__module__]
    if inspect.ismethod(obj) or inspect.isbuiltin(obj):
        owner = getattr(obj, "__self__", None)
        modules = [getattr(obj, "__module__", None)]
        if owner is not None and not inspect.ismodule(owner):
            modules.append(owner.__module__ if inspect.isclass(owner) else type(owner).__module__)
        return modules
    return []


def describe(obj: Any) -> str:
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj):
        kind = "the class" if inspect.isclass(obj) else "the function"
        return f"{kind} {getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', obj)}"
    return f"a {type(obj).__name__} object (not a class or function)"


def allowed_text(trust: tuple[str, ...]) -> str:
    parts = ",".join(c.removeprefix("trainkit.") for c in COMPONENTS if c.startswith("trainkit."))
    trusted = f"; trusted here: {', '.join(trust)}" if trust else ""
    return f"allowed: classes in trainkit.{{{parts}}}, torch.nn, torch.optim{trusted}"


def trust_hint(module: str) -> str:
    """The prefix to trust for ``module``: its top package, or the module itself inside
    trainkit and torch (trusting all of them would trust their file readers and writers too)."""
    top = module.split(".")[0]
    return module if top in ("trainkit", "torch") else top




