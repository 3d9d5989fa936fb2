"""The built-in models the presets use; any importable ``nn.Module`` works the same way."""

from trainkit.models.mlp import MLP
from trainkit.models.transformer import Transformer
from trainkit.models.vae import VAE

__all__ = ["MLP", "Transformer", "VAE"]
