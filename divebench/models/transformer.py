"""A small decoder-style transformer over token sequences (the ``modarith`` suite)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm ``nn.TransformerEncoderLayer``
    blocks under a causal mask (no dropout: the exact statistics replay attention per
    sample), a final LayerNorm and a linear head on the last position."""

    def __init__(self, vocab: int, seq_len: int, num_classes: int, width: int = 128, heads: int = 4,
                 layers: int = 1, ff: int = 512) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)
        self.register_buffer("where", torch.arange(seq_len), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.tokens(t) + self.positions(self.where.expand_as(t))
        for block in self.blocks:
            h = block(h, src_mask=self.mask.to(h.dtype), is_causal=True)
        return self.head(self.norm(h[:, -1]))  # type: ignore[no-any-return]


def build_transformer(num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
    """Model builder ``transformer``: inputs are token ids of shape (seq_len,), the
    vocabulary is num_classes + 1 (the ``modarith`` tokens: residues and ``=``)."""
    if len(input_shape) != 1:
        raise ValueError(f"transformer needs token sequences (seq_len,); got input_shape={input_shape}")
    return TinyTransformer(num_classes + 1, input_shape[0], num_classes)
