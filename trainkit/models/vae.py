"""A variational autoencoder for flat features (Kingma and Welling 2014), for ``task=vae``.

The encoder gives a diagonal Gaussian ``q(z|x) = N(mu, exp(logvar))``; the decoder gives
reconstruction *logits* (a Bernoulli per feature, or a Gaussian mean with
``loss.reconstruction=gaussian``). Training samples ``z`` with the reparameterisation
trick from the global torch RNG (saved in checkpoints, so resume stays exact); evaluation
decodes the posterior mean, so validation metrics are deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from trainkit.models.mlp import ACTIVATIONS, check_activation, check_sizes


class VAEOutput(NamedTuple):
    logits: Tensor  # [batch, in_features] reconstruction logits
    mu: Tensor  # [batch, latent_dim] posterior mean
    logvar: Tensor  # [batch, latent_dim] posterior log-variance


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers with the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder ``in_features -> hidden_sizes -> 2 * latent_dim``, decoder the mirror image.

    ``forward(x)`` returns ``VAEOutput(logits, mu, logvar)``; ``in_features`` normally comes
    from the data (``trainkit.run.build`` passes it).
    """

    def __init__(self, in_features: int, latent_dim: int = 16, hidden_sizes: Sequence[int] = (256, 128),
                 activation: str = "relu"):
        super().__init__()
        check_activation(activation)
        check_sizes(in_features=in_features, latent_dim=latent_dim, hidden_sizes=hidden_sizes)
        self.in_features, self.latent_dim = in_features, latent_dim
        self.encoder = mlp([in_features, *hidden_sizes, 2 * latent_dim], activation)
        self.decoder = mlp([latent_dim, *reversed(list(hidden_sizes)), in_features], activation)

    def fsdp_blocks(self) -> list[nn.Module]:
        """The units FSDP shards one at a time (distributed.strategy=fsdp)."""
        return [self.encoder, self.decoder]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.encoder(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation: grads reach mu, logvar
        else:
            z = mu
        return VAEOutput(self.decode(z), mu, logvar)
