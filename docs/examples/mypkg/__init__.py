"""An example of your own code in a trainkit run (docs/your-own-model.md): a model, a model
that computes its own loss, and a callback with state. Run from the repository root:

    PYTHONPATH=docs/examples trainkit train --config-dir docs/examples/myconf +experiment=linear_digits
"""

from __future__ import annotations

from typing import Any

import torch

from trainkit.callbacks import Callback


class Linear(torch.nn.Module):
    """One linear layer; ``in_features`` and ``out_features`` come from the data."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.layer = torch.nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class SelfLossMLP(torch.nn.Module):
    """A classifier whose forward returns its own loss (for ``task=model_loss``), as Hugging
    Face models do: ``{"loss": mean cross-entropy, "logits": ...}``."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class CountSteps(Callback):
    """Counts optimizer steps; its state rides in every checkpoint and comes back on resume."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer: Any) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
