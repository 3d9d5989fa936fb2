"""Losses beyond ``torch.nn``: composite losses of named weighted terms, and the VAE loss.

Every loss here returns a *sum* over the batch, as the loop expects (it divides by the
count of the whole optimizer step). A loss with named parts offers
``named_losses(output, target) -> {name: summed tensor}`` whose values add up to the loss;
``loss_and_terms`` is how a task calls any loss and gets those parts to log as
``train/loss/<name>``. Nothing here reads the data or the config files: terms are built
through ``trainkit.core.builder.instantiate``, the same checks as every other ``_target_``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trainkit.core.builder import accepted, resolve_target
from trainkit.core.errors import ConfigError, did_you_mean
from trainkit.core.precision import widened

TERM_KEYS = ("loss", "weight", "output_key", "target_key")


def loss_and_terms(loss_fn: Callable, output: Any, target: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """(the summed loss, its named parts to log): parts only from a loss that has them."""
    named = getattr(loss_fn, "named_losses", None)
    if named is None:
        return loss_fn(output, target), {}
    terms = named(output, target)
    return sum(terms.values()), terms


def select(value: Any, key: str | int | None, where: str) -> Any:
    """``value[key]`` for a dict or sequence, ``value.key`` for an object (a named tuple,
    a Hugging Face output), ``value`` itself for ``key=None``."""
    if key is None:
        return value
    if isinstance(value, Mapping):
        if key in value:
            return value[key]
        raise ConfigError(f"{where}={key!r}: not a key of the value it selects from "
                          f"(keys: {sorted(map(str, value))}){did_you_mean(str(key), map(str, value))}")
    if isinstance(key, int) and isinstance(value, (tuple, list)):
        if -len(value) <= key < len(value):
            return value[key]
        raise ConfigError(f"{where}={key}: out of range for a sequence of {len(value)}")
    if isinstance(key, str) and hasattr(value, key):
        return getattr(value, key)
    names = list(getattr(value, "_fields", ())) or [n for n in dir(value) if not n.startswith("_")]
    raise ConfigError(f"{where}={key!r}: a {type(value).__name__} has no such field"
                      f"{did_you_mean(str(key), names)}")


@dataclass
class Term:
    """One weighted part of a composite loss: ``weight * loss(output[output_key], target[target_key])``."""

    loss: Callable[[Any, Any], Tensor]
    weight: float = 1.0
    output_key: str | int | None = None
    target_key: str | int | None = None


class CompositeLoss:
    """A sum of named weighted terms, each a ``_target_`` of its own, each logged apart.

    ``terms`` maps a name to ``{loss: {_target_: ...}, weight: 1.0, output_key: null,
    target_key: null}``. A term is called ``loss(output[output_key], target[target_key])``:
    ``output`` is the model's output (a tensor, a dict, a named tuple such as the VAE's, a
    Hugging Face output), ``target`` what the task hands its loss (the labels for
    classification and regression, the input for ``vae``, the flat target tokens for
    ``seq2seq``). Term losses are built with ``reduction="sum"`` when they take it, and get
    the data's ``ignore_index`` and ``num_classes`` when they take those and do not set them.
    Live values are reachable for a curriculum: ``loss.terms.<name>.weight``,
    ``loss.terms.<name>.loss.<attribute>``.
    """

    def __init__(self, terms: Mapping[str, Any], reduction: str = "sum", ignore_index: int | None = None,
                 num_classes: int | None = None):
        if reduction != "sum":
            raise ConfigError(f"loss.reduction={reduction!r}: a composite loss sums its terms over the batch; "
                              "the loop normalises (remove the key)")
        if not terms:
            raise ConfigError("loss.terms: a composite loss needs at least one term "
                              "(loss.terms.NAME={loss: {_target_: ...}, weight: 1.0})")
        runtime = {k: v for k, v in (("ignore_index", ignore_index), ("num_classes", num_classes)) if v is not None}
        self.reduction = reduction
        self.terms = {str(name): build_term(str(name), spec, runtime) for name, spec in terms.items()}

    def named_losses(self, output: Any, target: Any) -> dict[str, Tensor]:
        """Each term's weighted sum, by name; their sum is the loss."""
        return {
            name: term.weight * term.loss(select(output, term.output_key, f"loss.terms.{name}.output_key"),
                                          select(target, term.target_key, f"loss.terms.{name}.target_key"))
            for name, term in self.terms.items()
        }

    def __call__(self, output: Any, target: Any) -> Tensor:
        return sum(self.named_losses(output, target).values())


def build_term(name: str, spec: Any, runtime: dict[str, Any]) -> Term:
    """A ``Term`` from its config, its loss checked and built like any ``_target_``."""
    from omegaconf import OmegaConf

    from trainkit.core.builder import instantiate

    path = f"loss.terms.{name}"
    if not isinstance(spec, Mapping) or "loss" not in spec:
        hint = " (the _target_ goes under 'loss')" if isinstance(spec, Mapping) and "_target_" in spec else ""
        raise ConfigError(f"{path}: expected {{loss: {{_target_: ...}}, weight: 1.0}}{hint}, got {spec!r}")
    unknown = [key for key in spec if key not in TERM_KEYS]
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: not a term key (keys: {', '.join(TERM_KEYS)})"
                          f"{did_you_mean(str(unknown[0]), TERM_KEYS, f'{path}.')}")
    weight = spec.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise ConfigError(f"{path}.weight={weight!r}: must be a number")
    node = OmegaConf.create(dict(spec["loss"]) if isinstance(spec["loss"], Mapping) else spec["loss"])
    loss = instantiate(node, f"{path}.loss", runtime, **reduction_sum(node))
    return Term(loss, float(weight), spec.get("output_key"), spec.get("target_key"))


class L2Penalty:
    """``0.5 * ||output||^2`` per sample, summed over the batch (``reduction="mean"``: averaged).

    On logits it is a "logit penalty" (as the z-loss of large language models): it keeps
    logits from growing without bound once the cross-entropy is nearly zero. The target is
    ignored, so it combines with any task in a composite loss.
    """

    def __init__(self, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"loss.reduction={reduction!r}: must be 'sum' or 'mean'")
        self.reduction = reduction

    def __call__(self, output: Tensor, target: Any = None) -> Tensor:
        per_sample = 0.5 * widened(output).pow(2).flatten(1).sum(1)
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


# The VAE ---------------------------------------------------------------------------------------
class VAEParts(NamedTuple):
    """Per-sample parts of the negative ELBO, in nats, shape [batch]."""

    reconstruction: Tensor
    kl: Tensor


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample, in closed form, summed over latent dims:
    ``0.5 * sum(mu^2 + exp(logvar) - logvar - 1)``."""
    mu, logvar = widened(mu), widened(logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)


def reconstruction_nll(logits: Tensor, target: Tensor, kind: str) -> Tensor:
    """Negative log-likelihood of ``target`` per sample, summed over features."""
    logits, target = widened(logits).flatten(1), widened(target).flatten(1)
    if kind == "bernoulli":  # inputs in [0, 1]: binary cross-entropy on the decoder's logits
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    return 0.5 * (logits - target).pow(2).sum(1)  # gaussian with unit variance, constant dropped


class GaussianKL:
    """The VAE's KL term alone, for a composite loss: reads ``mu`` and ``logvar`` from the
    model output (the whole output: leave ``output_key`` null), summed over the batch."""

    def __init__(self, reduction: str = "sum"):
        self.reduction = reduction

    def __call__(self, output: Any, target: Any = None) -> Tensor:
        kl = gaussian_kl(select(output, "mu", "output"), select(output, "logvar", "output"))
        return kl.sum() if self.reduction == "sum" else kl.mean()


class VAELoss:
    """Negative ELBO with a weighted KL: ``reconstruction + beta * KL``, summed over samples.

    ``output`` is the VAE's (``logits``, ``mu``, ``logvar``), ``target`` the input itself.
    ``reconstruction``: ``bernoulli`` (BCE with logits, inputs in [0, 1]) or ``gaussian``
    (unit-variance squared error). ``beta`` is a live attribute: ``task=vae`` warms it up and
    controls it, and a curriculum may schedule it (``loss.beta``).
    """

    RECONSTRUCTIONS = ("bernoulli", "gaussian")

    def __init__(self, beta: float = 1.0, reconstruction: str = "bernoulli", reduction: str = "sum"):
        if reconstruction not in self.RECONSTRUCTIONS:
            raise ConfigError(f"loss.reconstruction={reconstruction!r}: choose one of {list(self.RECONSTRUCTIONS)}")
        if reduction != "sum":
            raise ConfigError(f"loss.reduction={reduction!r}: the VAE loss is summed over samples (remove the key)")
        if beta < 0:
            raise ConfigError(f"loss.beta={beta}: must be >= 0")
        self.beta, self.reconstruction, self.reduction = float(beta), reconstruction, reduction

    def parts(self, output: Any, target: Tensor) -> VAEParts:
        return VAEParts(reconstruction_nll(output.logits, target, self.reconstruction),
                        gaussian_kl(output.mu, output.logvar))

    def mean(self, logits: Tensor) -> Tensor:
        """The expected reconstruction in input units (pixel intensities in [0, 1])."""
        return torch.sigmoid(widened(logits)) if self.reconstruction == "bernoulli" else widened(logits)

    def __call__(self, output: Any, target: Tensor) -> Tensor:
        parts = self.parts(output, target)
        return parts.reconstruction.sum() + self.beta * parts.kl.sum()


def reduction_sum(loss_cfg: Any) -> dict[str, str]:
    params, takes_any = accepted(resolve_target(loss_cfg, "loss"))
    return {"reduction": "sum"} if "reduction" in params else {}
