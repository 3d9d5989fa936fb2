"""Contrastive learning on images with in-batch negatives (InfoNCE), with gradient caching.

Each image of a batch gives two augmented views (random shifts of up to ``max_shift_pixels``
and Gaussian pixel noise, drawn from torch's global RNG, which checkpoints save, so resume
stays exact). The encoder embeds both; the loss is the symmetric InfoNCE of Oord et al. 2018
(view A must pick its own view B among all B views of the batch, and the other way round),
summed over images so the loop's per-sample normalisation applies. Negatives come from the
micro-batch of one process: accumulation and DDP add updates, not negatives.

Gradient cache (Gao et al. 2021, ``trainer.gradient_cache.chunk_size``): the loss couples
every image of the batch, so the batch cannot be split like an ordinary one. Instead the
encoder runs chunk by chunk without a graph, the loss and its gradient with respect to the
embeddings are computed on the whole batch, then each chunk is encoded again with a graph
and back-propagates its slice of that gradient. Peak memory is that of one chunk's graph
(plus the batch's embeddings); the loss and gradients equal the full-batch ones (to float
rounding) at the cost of a second encoder forward. Each chunk's re-run replays the RNG state
of its first pass, so dropout draws the same masks.

Validation embeds two views of every image (from a private generator seeded by ``eval_seed``
and the batch's pixels, so every evaluation sees the same views, a batch gets the same views on
whichever rank evaluates it, and the training RNG is untouched) and reports ``recall_at_1``: the
share of images whose view-A embedding has its own view B as nearest neighbour (cosine) among
the view-B embeddings of the whole validation set, gathered from every rank. Under DDP the
metric therefore equals one process evaluating the same batches.

Losses and similarities are computed in float32, or in float64 under ``precision=fp64``.

Never: draw augmentation randomness from anything but torch's global RNG (training) or a
seeded private generator (validation); let the re-run of a chunk draw different randomness
than its first pass.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainkit.core.errors import ConfigError
from trainkit.core.precision import widened
from trainkit.core.ranks import gather_lists
from trainkit.tasks.base import Task


def info_nce_sum(view_a: Tensor, view_b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE summed over the batch: row i of each view is the positive of row i
    of the other, every other row a negative. Computed in fp32 or fp64 (outside autocast)."""
    with torch.autocast(view_a.device.type, enabled=False):
        a, b = F.normalize(widened(view_a), dim=-1), F.normalize(widened(view_b), dim=-1)
        logits = a @ b.T / temperature  # [batch, batch] cosine similarities / T
        labels = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, labels, reduction="sum")
                + F.cross_entropy(logits.T, labels, reduction="sum")) / 2


def recall_at_1(view_a: Tensor, view_b: Tensor) -> float:
    """Share of rows whose nearest view-B embedding (cosine) is their own."""
    a, b = F.normalize(widened(view_a), dim=-1), F.normalize(widened(view_b), dim=-1)
    nearest = (a @ b.T).argmax(dim=1)
    return float((nearest == torch.arange(len(a), device=a.device)).float().mean())


def rng_snapshot(device: torch.device) -> Callable[[], None]:
    """A function that puts torch's RNG (CPU, and the device's on CUDA) back to its state now."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return restore


class ContrastiveTask(Task):
    """InfoNCE on two augmented views of each image; the model is the encoder (its output is
    the embedding). ``in_features`` comes from the data (square images, flattened)."""

    metric_names = ("recall_at_1",)

    def __init__(self, in_features: int, temperature: float = 0.1, max_shift_pixels: int = 1,
                 noise_std: float = 0.1, gradient_cache_chunk_size: int | None = None, eval_seed: int = 0):
        side = math.isqrt(in_features)
        if side * side != in_features:
            raise ConfigError(f"task=contrastive: the data's {in_features} features are not a square image")
        if not temperature > 0:
            raise ConfigError(f"task.temperature={temperature}: must be positive")
        if max_shift_pixels < 0 or noise_std < 0:
            raise ConfigError("task.max_shift_pixels and task.noise_std must be >= 0")
        if gradient_cache_chunk_size is not None and gradient_cache_chunk_size < 1:
            raise ConfigError(f"trainer.gradient_cache.chunk_size={gradient_cache_chunk_size}: must be at least 1 or null")
        self.side, self.temperature = side, temperature
        self.max_shift, self.noise_std = max_shift_pixels, noise_std
        self.chunk_size, self.eval_seed = gradient_cache_chunk_size, eval_seed

    def count(self, batch: Any) -> int:
        return len(batch[0])

    # Views and embeddings ---------------------------------------------------------------------
    def augment(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random view of each flattened image: shifted by up to ``max_shift`` pixels
        (zeros come in at the edge) plus N(0, noise_std) pixel noise, clamped to [0, 1]."""
        n, side, shift = len(images), self.side, self.max_shift
        draw_on = generator.device if generator is not None else images.device
        padded = F.pad(images.view(n, side, side), (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator, device=draw_on).to(images.device)
        grid = torch.arange(side, device=images.device)
        rows = (offsets[:, 0, None] + grid)[:, :, None]  # [n, side, 1]
        cols = (offsets[:, 1, None] + grid)[:, None, :]  # [n, 1, side]
        shifted = padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]
        noise = torch.randn(shifted.shape, generator=generator, device=draw_on).to(images.device)
        return (shifted + self.noise_std * noise).clamp(0.0, 1.0).flatten(1)

    def views(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[batch, 2, features]``: two independent views of each image."""
        return torch.stack([self.augment(images, generator), self.augment(images, generator)], dim=1)

    @staticmethod
    def encode(model: nn.Module, pairs: Tensor) -> Tensor:
        """``[n, 2, features]`` -> ``[n, 2, embedding]`` in one encoder pass."""
        return model(pairs.flatten(0, 1)).unflatten(0, (len(pairs), 2))

    def loss_of(self, embeddings: Tensor) -> Tensor:
        return info_nce_sum(embeddings[:, 0], embeddings[:, 1], self.temperature)

    # Training -----------------------------------------------------------------------------------
    def loss_sum(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss_of(self.encode(model, self.views(batch[0]))), {}

    def forward_backward(self, model: nn.Module, batch: Any, normaliser: float,
                         precision: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain forward and backward, or the gradient-cached one when the batch holds
        more than ``chunk_size`` images."""
        if self.chunk_size is None or len(batch[0]) <= self.chunk_size:
            return super().forward_backward(model, batch, normaliser, precision)
        chunks = self.views(batch[0]).split(self.chunk_size)  # augmentation drawn once, before chunking
        device = chunks[0].device
        # 1. Embeddings chunk by chunk, no graphs; remember each chunk's RNG state for its re-run.
        replays, cached = [], []
        with torch.no_grad():
            for chunk in chunks:
                replays.append(rng_snapshot(device))
                with precision.autocast():
                    cached.append(widened(self.encode(model, chunk)))
        after_first_pass = rng_snapshot(device)
        # 2. Loss and its gradient w.r.t. the embeddings, on the whole batch (scaled as the loop's loss).
        embeddings = torch.cat(cached).requires_grad_()
        loss_sum = self.loss_of(embeddings)
        precision.scaler.scale(loss_sum / normaliser).backward()
        # 3. Each chunk again with a graph, back-propagating its slice of the embedding gradient.
        #    Under DDP only the last chunk's backward all-reduces (the earlier ones accumulate).
        no_sync = getattr(model, "no_sync", nullcontext)
        for index, (chunk, replay, grad) in enumerate(zip(chunks, replays, embeddings.grad.split(self.chunk_size))):
            replay()  # the same dropout masks as the first pass
            with no_sync() if index < len(chunks) - 1 else nullcontext():
                with precision.autocast():
                    embedded = widened(self.encode(model, chunk))
                embedded.backward(grad)
        after_first_pass()  # the RNG continues as after one pass, as in the plain computation
        return loss_sum.detach(), {}

    # Evaluation ---------------------------------------------------------------------------------
    def eval_start(self, device: torch.device) -> None:
        self.embedded: list[Tensor] = []

    def eval_generator(self, images: Tensor) -> torch.Generator:
        """The private generator of one validation batch's views: seeded by ``eval_seed`` and
        the batch's pixels (as float32, the same under every precision), not by the batch's
        position, so the views do not depend on how batches are spread over ranks."""
        pixels = images.detach().float().cpu().contiguous().numpy().tobytes()
        digest = hashlib.blake2b(pixels, digest_size=8, key=str(self.eval_seed).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))

    def eval_step(self, model: nn.Module, batch: Any) -> Tensor:
        images = batch[0]
        embeddings = widened(self.encode(model, self.views(images, self.eval_generator(images))))
        self.embedded.append(embeddings.cpu())
        return self.loss_of(embeddings)

    def eval_metrics(self, loss: float) -> dict[str, float]:
        # Every rank joins the gather, also one that had no validation batch: a collective
        # that only some ranks call never returns.
        embedded = gather_lists(self.embedded)
        if not embedded:
            return {}
        embeddings = torch.cat(embedded)
        return {"recall_at_1": recall_at_1(embeddings[:, 0], embeddings[:, 1])}

