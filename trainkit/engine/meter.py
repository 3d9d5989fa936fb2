"""The training losses, metered on the device: summed per step without a sync, read once per
logging window and once per epoch (one all-reduce each under DDP)."""

from __future__ import annotations

import torch

from trainkit.core.devices import peak_memory_mb
from trainkit.core.ranks import Dist


class LossMeter:
    """Summed losses over the logging window (with named terms) and over the epoch, read
    only when logged. A step only keeps its detached loss tensor (no kernel, no sync); the
    kept tensors are summed on the device when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: list[torch.Tensor] = []  # step losses not yet summed into the two below
        self.window_loss = self.zero()
        self.epoch_loss = self.zero()
        self.epoch_units = 0.0
        self.reset()

    def zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        """Start a new logging window."""
        self.window_loss = self.zero()
        self.terms: dict[str, list[torch.Tensor]] = {}
        self.units = 0.0
        self.steps = 0
        self.seconds = 0.0

    def add(self, loss_sum: torch.Tensor, count: int, terms: dict[str, torch.Tensor] | None = None,
            keep: bool | torch.Tensor = True) -> None:
        """A micro-batch's summed loss over ``count`` units. ``keep``: whether its update was
        applied; False drops it, a device flag masks it on the device (its units leave with
        ``drop_units`` once the flag is read)."""
        if keep is False:
            return
        if isinstance(keep, torch.Tensor):
            zero = torch.zeros((), dtype=loss_sum.dtype, device=loss_sum.device)
            loss_sum = torch.where(keep, loss_sum, zero)
            terms = {name: torch.where(keep, value.detach(), zero.to(value.dtype)) for name, value in (terms or {}).items()}
        self.pending.append(loss_sum)
        if len(self.pending) >= 1024:  # long logging windows: bounded memory, one kernel per 1,024 steps
            self.fold()
        for name, value in (terms or {}).items():
            self.terms.setdefault(name, []).append(value.detach())
        self.units += count
        self.epoch_units += count

    def drop_units(self, units: float) -> None:
        """Units of a step whose update was skipped (its losses were masked on the device)."""
        self.units -= units
        self.epoch_units -= units

    def add_step(self, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds

    def fold(self) -> None:
        """Sum the kept step losses (and terms) on the device: into the window and the epoch."""
        if self.pending:
            summed = total(self.pending, self.device)
            self.window_loss = self.window_loss + summed
            self.epoch_loss = self.epoch_loss + summed
            self.pending = []
        self.terms = {name: [total(values, self.device)] for name, values in self.terms.items()}

    def read(self, dist: Dist) -> tuple[dict[str, float], float]:
        """(mean loss and terms per unit over the window and all ranks, units counted);
        starts a new window."""
        self.fold()
        names = sorted(self.terms)
        units = torch.tensor(self.units, dtype=torch.float64, device=self.device)
        packed = torch.stack([self.window_loss, units, *[total(self.terms[n], self.device) for n in names]])
        totals = dist.sum(packed).tolist()  # .tolist() waits for the device
        per_unit = max(totals[1], 1.0)
        values = {"train/loss": totals[0] / per_unit}
        values.update({f"train/loss/{n}": v / per_unit for n, v in zip(names, totals[2:])})
        self.reset()
        return values, totals[1]

    def train_metrics(self, dist: Dist, learning_rate: float, grad_norm: torch.Tensor, unit: str) -> dict[str, float]:
        """What a logging step reports: the window's losses, learning rate, gradient norm,
        throughput, step time and peak memory; starts a new window."""
        steps, seconds = self.steps, self.seconds
        values, units = self.read(dist)  # waits for the device: only every N steps
        return {**values, "train/learning_rate": learning_rate, "train/grad_norm": float(grad_norm),
                f"train/{unit}_per_second": units / max(seconds, 1e-9), "train/step_time_ms": 1000 * seconds / max(1, steps),
                "train/peak_memory_mb": peak_memory_mb(self.device)}

    def read_epoch(self, dist: Dist) -> float:
        """The mean loss per unit over the epoch and all ranks; starts a new epoch (the
        logging window carries on)."""
        self.fold()
        units = torch.tensor(self.epoch_units, dtype=torch.float64, device=self.device)
        loss, units = dist.sum(torch.stack([self.epoch_loss, units])).tolist()
        self.epoch_loss = self.zero()
        self.epoch_units = 0.0
        return loss / max(units, 1.0)


def total(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The float64 sum of scalar tensors (zero for none), on ``device``."""
    if not values:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(values).to(device=device, dtype=torch.float64).sum()
