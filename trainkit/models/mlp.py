"""A multi-layer perceptron for flat features (digits pixels, tabular rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainkit.core.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def check_sizes(**sizes: Any) -> None:
    """Refuse, naming ``model.<key>``, a size that is not an integer >= 1 (for a list: any
    entry). torch builds a zero-width layer without complaint; its output is a constant."""
    for key, value in sizes.items():
        values = list(value) if isinstance(value, Sequence) else [value]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"model.{key}={value}: sizes must be integers >= 1 (got {bad[0]!r})")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={activation!r}: choose one of {sorted(ACTIVATIONS)}")


class MLP(nn.Module):
    """Linear -> activation -> dropout blocks, then a linear head.

    ``in_features`` and ``out_features`` normally come from the data (``trainkit.run.build``
    passes them); ``gradient_checkpointing`` recomputes each block in backward to save
    activation memory.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        activation: str = "relu",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        check_activation(activation)
        check_sizes(in_features=in_features, out_features=out_features, hidden_sizes=hidden_sizes)
        sizes = [in_features, *hidden_sizes]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), ACTIVATIONS[activation](), nn.Dropout(dropout))
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.head = nn.Linear(sizes[-1], out_features)
        self.gradient_checkpointing = gradient_checkpointing

    def fsdp_blocks(self) -> list[nn.Module]:
        """The units FSDP shards one at a time (distributed.strategy=fsdp)."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(x)
