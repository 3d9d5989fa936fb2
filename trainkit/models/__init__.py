"""The built-in models the presets use; any importable ``nn.Module`` works the same way."""

from trainkit.models.mlp import MLP
from trainkit.models.transformer import Transformer
from trainkit.models.vae import VAE

__all__ = ["MLP", "HFModel", "Transformer", "VAE"]


def __getattr__(name: str):
    if name == "HFModel":  # model=hf: transformers is imported only when it is used
        from trainkit.models.hf import HFModel

        return HFModel
    raise AttributeError(name)
