"""The built-in models the presets use; any importable ``nn.Module`` works the same way."""

from trainkit.models.mlp import MLP
from trainkit.models.transformer import Transformer

__all__ = ["MLP", "Transformer"]
