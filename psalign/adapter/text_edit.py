"""The user text edit: a small transformer that rewrites the text tokens a cross-attention layer sees.

The published PSA branch adds ``scale * attention(query, user tokens)`` to each cross-attention
output. That shift is the same whatever the caption asks for, so it cannot take one concept out
of a caption and leave another in: it can only add. The text edit acts on the caption itself,
per text token and conditioned on the user, before the layer's key and value projections::

    h = text;  h = h + Attn(LN(h), [LN(h); user]);  h = h + MLP(LN(h))     (num_layers times)
    edited = text + W_out LN(h)                                             (W_out zero-initialised)

Every text token sees the whole caption (the edit is bidirectional, unlike a causal text encoder)
and the user tokens, so the tokens that name a banned concept, and the ones after them that carry
it, can be moved to what the caption would be without it, while an allowed concept is left as it
is. A fresh edit is the identity. One edit is shared by every cross-attention layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _EditBlock(nn.Module):
    """Pre-norm block: attention of the text tokens over ``[text; user]``, then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_text = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, hidden: torch.Tensor, user_tokens: torch.Tensor) -> torch.Tensor:
        text = self.norm_text(hidden)
        context = torch.cat([text, user_tokens], dim=1)
        hidden = hidden + self.attn(text, context, context, need_weights=False)[0]
        return hidden + self.mlp(self.norm_mlp(hidden))


class UserTextEdit(nn.Module):
    """Text tokens (B, L, d_c) and user tokens (B, N, d_c) -> edited text tokens (B, L, d_c).

    ``num_layers`` blocks of width d_c with ``num_heads`` heads; computed in the edit's own dtype
    (fp32 in training) and returned in the text's dtype.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError("a text edit needs at least one layer")
        if dim % num_heads:
            raise ValueError(f"the text width {dim} is not divisible by {num_heads} heads")
        self.blocks = nn.ModuleList(_EditBlock(dim, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, text: torch.Tensor, user_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.proj_out.weight.dtype
        hidden = text.to(dtype)
        user_tokens = user_tokens.to(dtype)
        for block in self.blocks:
            hidden = block(hidden, user_tokens)
        return (text.to(dtype) + self.proj_out(self.norm_out(hidden))).to(text.dtype)


def text_edit_heads(dim: int) -> int:
    """Heads of a text edit of width ``dim``: one per 64 channels (1 for a narrower text)."""
    return max(1, dim // 64)
