"""Encoder-decoder Transformer for neural machine translation.

The model follows Vaswani et al. (2017) with the usual modern options (pre-norm, tied
embeddings, gradient checkpointing). It is written from plain ``nn.Linear`` layers and
``F.scaled_dot_product_attention`` rather than ``nn.Transformer`` because decoding needs a
key/value cache that can be reordered for beam search (see :class:`DecoderCache`).

Conventions used throughout:

* token ids are ``LongTensor``s shaped ``[batch, time]``, right-padded with ``pad_id``;
* ``src_pad_mask`` is ``True`` where the source is padding;
* attention masks handed to ``scaled_dot_product_attention`` are boolean and ``True`` where
  attention is *allowed*.

Target-side key padding is deliberately not applied in decoder self-attention: targets are
right-padded and the causal mask already stops every real position from seeing the padding
after it, so the extra mask would cost memory (and cache bookkeeping) without changing any
logit that the loss reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainkit.core.errors import ConfigError
from trainkit.models.mlp import check_sizes

__all__ = ["DecoderCache", "LayerCache", "Transformer"]


@dataclass
class LayerCache:
    """Keys/values of one decoder layer, each ``[batch, heads, time, head_dim]``."""

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    # Cross-attention keys/values depend only on the encoder output, so they are
    # projected once on the first cached decode call and reused at every later step.
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None


class DecoderCache:
    """Incremental-decoding state for :meth:`Transformer.decode`.

    Holds, per decoder layer, the self-attention keys/values of every target position fed
    so far and the cross-attention keys/values of the source; plus the source padding mask
    and the number of cached target positions (``length``, which is also the position index
    of the next token). The cache starts empty; the first ``decode`` call fixes its batch.

    Because the cross-attention keys/values and the source padding mask are stored here,
    ``memory`` and ``src_pad_mask`` passed to ``decode`` are only read on the first call;
    afterwards the cached (and possibly reordered) copies are used, so a beam search only
    has to reorder the cache, never the encoder output.
    """

    def __init__(self, num_layers: int) -> None:
        self.layers: list[LayerCache] = [LayerCache() for _ in range(num_layers)]
        self.src_pad_mask: Tensor | None = None
        self.length: int = 0

    def reorder(self, index: Tensor) -> None:
        """Select batch rows in place: row ``i`` becomes old row ``index[i]``.

        Used by beam search after each step to follow surviving hypotheses; ``index`` may
        repeat rows (a hypothesis with several children) and may change the batch size.
        """
        for layer in self.layers:
            for name in ("self_k", "self_v", "cross_k", "cross_v"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.index_select(0, index.to(t.device)))
        if self.src_pad_mask is not None:
            self.src_pad_mask = self.src_pad_mask.index_select(
                0, index.to(self.src_pad_mask.device)
            )


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """The fixed sine/cosine position table of Vaswani et al., shape ``[max_len, d_model]``."""
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoidal positions, got {d_model}")
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    # 10000 ** (-2i / d_model), computed in log space to stay accurate for large d_model.
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


def key_padding_to_attn_mask(pad_mask: Tensor) -> Tensor:
    """``[B, S]`` padding mask (True = pad) -> ``[B, 1, 1, S]`` allow-mask for SDPA.

    A row that is entirely padding (an empty source) would have no key to attend to; a
    softmax over nothing is NaN on some torch versions/backends. Such rows are allowed to
    attend everywhere instead: their output is meaningless but finite, and it never leaks
    into other rows.
    """
    allow = ~pad_mask
    allow = allow | ~allow.any(dim=-1, keepdim=True)
    return allow[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separately callable K/V projection.

    Splitting :meth:`project_kv` from :meth:`forward` is what makes caching possible: the
    decoder projects only the new positions and concatenates them to the cached ones.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, time, _ = x.shape
        return x.view(batch, time, self.num_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, S, D]`` -> keys and values, each ``[B, H, S, D/H]``."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> Tensor:
        """Attend from queries ``x`` ``[B, T, D]`` to projected ``k``/``v``; returns ``[B, T, D]``."""
        q = self._split_heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        batch, _, time, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, time, -1))


class FeedForward(nn.Module):
    """Position-wise two-layer MLP with ReLU, as in the original Transformer."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class _Residual(nn.Module):
    """Base for layers: self-attention and feed-forward sublayers, and the one place that
    decides between pre-norm and post-norm wiring."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def _residual(
        self, x: Tensor, norm: nn.LayerNorm, sublayer: Callable[[Tensor], Tensor]
    ) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(_Residual):
    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        x = self._residual(
            x, self.norm1, lambda h: self.self_attn(h, *self.self_attn.project_kv(h), attn_mask)
        )
        return self._residual(x, self.norm2, self.ffn)


class DecoderLayer(_Residual):
    def __init__(
        self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool
    ) -> None:
        super().__init__(d_model, num_heads, ffn_dim, dropout, norm_first)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def _self_attention(
        self, h: Tensor, attn_mask: Tensor | None, cache: LayerCache | None
    ) -> Tensor:
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            if cache.self_k is not None:
                k = torch.cat([cache.self_k, k], dim=2)
                v = torch.cat([cache.self_v, v], dim=2)
            cache.self_k, cache.self_v = k, v
        return self.self_attn(h, k, v, attn_mask)

    def _cross_attention(
        self, h: Tensor, memory: Tensor, attn_mask: Tensor, cache: LayerCache | None
    ) -> Tensor:
        if cache is not None and cache.cross_k is not None:
            k, v = cache.cross_k, cache.cross_v
        else:
            k, v = self.cross_attn.project_kv(memory)
            if cache is not None:
                cache.cross_k, cache.cross_v = k, v
        return self.cross_attn(h, k, v, attn_mask)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor | None,
        cross_mask: Tensor,
        cache: LayerCache | None = None,
    ) -> Tensor:
        x = self._residual(x, self.norm1, lambda h: self._self_attention(h, self_mask, cache))
        x = self._residual(
            x, self.norm2, lambda h: self._cross_attention(h, memory, cross_mask, cache)
        )
        return self._residual(x, self.norm3, self.ffn)


def check_arguments(pad_id: int, **sizes: int) -> None:
    """Refuse, naming the ``model.*`` keys, sizes a :class:`Transformer` cannot be built with:
    every size an integer >= 1, ``d_model`` even and divisible by ``num_heads``, ``pad_id`` a
    token id of both vocabularies."""
    check_sizes(**sizes)
    d_model, num_heads = sizes["d_model"], sizes["num_heads"]
    if d_model % num_heads or d_model % 2:
        fitting = 2 * num_heads * math.ceil(d_model / (2 * num_heads))
        raise ConfigError(f"model.d_model={d_model}, model.num_heads={num_heads}: d_model must be even (sinusoidal "
                          f"positions) and divisible by num_heads, e.g. model.d_model={fitting}")
    src_vocab_size, tgt_vocab_size = sizes["src_vocab_size"], sizes["tgt_vocab_size"]
    if not 0 <= pad_id < min(src_vocab_size, tgt_vocab_size):
        raise ConfigError(f"model.pad_id={pad_id}: not a token id of the vocabularies ({src_vocab_size}, {tgt_vocab_size})")


class Transformer(nn.Module):
    """Encoder-decoder Transformer for sequence-to-sequence tasks (machine translation).

    Args:
        src_vocab_size / tgt_vocab_size: vocabulary sizes (ids are ``0..size-1``).
        pad_id: padding id in both vocabularies; padded source positions are masked out of
            every attention, and the embedding row of ``pad_id`` starts at zero (it is the
            ``padding_idx`` of the embeddings, so lookups never train it; a tied output
            projection may still move it, which is harmless because padding is masked).
        d_model, num_heads, ffn_dim: widths; ``d_model`` must be even and divisible by
            ``num_heads``.
        norm_first: pre-norm (LayerNorm before each sublayer, plus a final LayerNorm after
            each stack) if True, the original post-norm otherwise.
        tie_embeddings: share the target embedding with the output projection, and also
            with the source embedding when the two vocabularies have the same size (a joint
            vocabulary, e.g. one SentencePiece model).
        max_len: longest source or target sequence (size of the position table).
        gradient_checkpointing: in training, recompute each layer's activations in the
            backward pass instead of storing them (less memory, about a third more compute).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        pad_id: int = 0,
        d_model: int = 128,
        num_heads: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        ffn_dim: int = 512,
        dropout: float = 0.1,
        norm_first: bool = True,
        tie_embeddings: bool = True,
        max_len: int = 512,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, d_model=d_model,
                        num_heads=num_heads, num_encoder_layers=num_encoder_layers,
                        num_decoder_layers=num_decoder_layers, ffn_dim=ffn_dim, max_len=max_len, pad_id=pad_id)
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.pad_id = pad_id
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.norm_first = norm_first
        self.tie_embeddings = tie_embeddings
        self.max_len = max_len
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_scale = math.sqrt(d_model)

        self._build_embeddings()
        # Fixed positions are a buffer (moves with .to(), never trained); non-persistent so
        # checkpoints hold only learned tensors and max_len can change between runs.
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)

        layer_args = (d_model, num_heads, ffn_dim, dropout, norm_first)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(*layer_args) for _ in range(num_encoder_layers)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(*layer_args) for _ in range(num_decoder_layers)
        )
        # Pre-norm leaves the residual stream un-normalised, so each stack ends with a
        # LayerNorm; post-norm outputs are already normalised.
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()

        self._reset_parameters()

    def _build_embeddings(self) -> None:
        """The target and source embeddings and the output projection, tied as
        ``tie_embeddings`` says (see the class docstring)."""
        self.tgt_embed = nn.Embedding(self.tgt_vocab_size, self.d_model, padding_idx=self.pad_id)
        if self.tie_embeddings and self.src_vocab_size == self.tgt_vocab_size:
            # The same module under two names: one parameter, two state_dict entries that
            # share storage (torch.save keeps the sharing; load_state_dict copies into it).
            self.src_embed = self.tgt_embed
        else:
            self.src_embed = nn.Embedding(self.src_vocab_size, self.d_model, padding_idx=self.pad_id)
        self.output_proj = nn.Linear(self.d_model, self.tgt_vocab_size, bias=False)
        if self.tie_embeddings:
            self.output_proj.weight = self.tgt_embed.weight

    def _reset_parameters(self) -> None:
        embeddings = {id(self.src_embed.weight), id(self.tgt_embed.weight)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in embeddings:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Embeddings last, so a tied output projection ends up with the embedding init.
        # std d_model**-0.5 times the sqrt(d_model) input scale gives unit-variance inputs,
        # and keeps tied output logits at unit scale.
        for embedding in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(embedding.weight, mean=0.0, std=self.d_model**-0.5)
            with torch.no_grad():
                embedding.weight[self.pad_id].zero_()

    def new_cache(self) -> DecoderCache:
        """An empty cache for incremental :meth:`decode` calls."""
        return DecoderCache(self.num_decoder_layers)

    def _embed(self, embedding: nn.Embedding, ids: Tensor, start: int) -> Tensor:
        end = start + ids.size(1)
        if end > self.max_len:
            raise ValueError(f"sequence length {end} exceeds the model's max_len {self.max_len}")
        x = embedding(ids) * self.embed_scale + self.positions[start:end].to(
            dtype=embedding.weight.dtype
        )
        return self.embed_dropout(x)

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def fsdp_blocks(self) -> list[nn.Module]:
        """The units FSDP shards one at a time (distributed.strategy=fsdp): every layer."""
        return [*self.encoder_layers, *self.decoder_layers]

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src: [B, S] token ids (pad_id for padding). Returns memory [B, S, D] and src_pad_mask [B, S] (True where padding)."""
        src_pad_mask = src.eq(self.pad_id)
        attn_mask = key_padding_to_attn_mask(src_pad_mask)
        x = self._embed(self.src_embed, src, 0)
        for layer in self.encoder_layers:
            if self._checkpointing():
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return self.encoder_norm(x), src_pad_mask

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        src_pad_mask: Tensor,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """tgt_in: [B, T] ids (starts with BOS). Returns logits [B, T, tgt_vocab].

        With a cache, tgt_in holds only the NEW positions (usually T=1) and the cache is
        updated in place with their keys/values; positions continue from cache length.
        ``memory`` and ``src_pad_mask`` are read only by the first call on a fresh cache
        (see :class:`DecoderCache`).
        """
        start = 0
        if cache is not None:
            start = cache.length
            if cache.src_pad_mask is None:
                cache.src_pad_mask = src_pad_mask
            src_pad_mask = cache.src_pad_mask
        time = tgt_in.size(1)
        x = self._embed(self.tgt_embed, tgt_in, start)

        # Causal mask over [new positions, all positions]: query i (absolute start+i) may see
        # keys 0..start+i. A single new token may see everything cached, so no mask needed.
        self_mask = None
        if time > 1:
            self_mask = torch.ones(time, start + time, dtype=torch.bool, device=tgt_in.device).tril(
                start
            )
        cross_mask = key_padding_to_attn_mask(src_pad_mask)

        use_checkpoint = cache is None and self._checkpointing()
        for i, layer in enumerate(self.decoder_layers):
            if use_checkpoint:
                x = checkpoint(layer, x, memory, self_mask, cross_mask, None, use_reentrant=False)
            else:
                x = layer(
                    x, memory, self_mask, cross_mask, cache.layers[i] if cache is not None else None
                )
        if cache is not None:
            cache.length += time
        return self.output_proj(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, T, tgt_vocab]`` for sources ``[B, S]`` and decoder inputs ``[B, T]``."""
        memory, src_pad_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_pad_mask)
