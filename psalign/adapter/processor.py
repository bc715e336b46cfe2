"""The attention processor that injects the user branch into one cross-attention layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .adapter import PSAAdapter


class UserCrossAttnProcessor:
    """Cross-attention processor: text attention plus ``scale`` x attention over the user tokens.

    The layer's own query attends to the user tokens through the adapter's per-layer key/value
    projections, and the result is added before the layer's output projection.

    * **One user token (fast path).** Softmax over one key is 1, so the user branch is the
      per-layer constant ``scale * W_v u``. The adapter maps it through the layer's output
      projection once per user set (``W_o (scale W_v u)``, no bias); here it is one broadcast
      add after the stock processor. Exact: ``to_out(h + c) = to_out(h) + W_o c``.
    * **Several user tokens (general path).** A second attention call with the layer's query
      over the user keys/values.

    With a text edit (``PSAAdapter.text_edit``), ``encoder_hidden_states`` arrives already edited
    for each row's user: the adapter edits it once per UNet call, in a forward pre-hook.

    The processor holds no weights: they live in the adapter (so the frozen UNet's dtype casts
    and ``requires_grad_`` never touch them). With the adapter disabled, or switched off by
    ``PSAAdapter.disabled()``, it defers to the layer's original processor unchanged.
    """

    def __init__(self, adapter: "PSAAdapter", layer_index: int, base_processor: Any):
        self.adapter = adapter
        self.layer_index = layer_index
        self.base_processor = base_processor

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        cond = self.adapter.active_conditioning()
        if cond is None:
            return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        cond.check_batch(hidden_states.shape[0])
        if cond.output_offsets is not None:
            out = self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
            offset = cond.output_offsets[self.layer_index].to(out.dtype)  # (B, C_out)
            # in place: no new activation tensor (autograd refuses it loudly if it were ever unsafe)
            return out.add_(offset[:, :, None, None] if out.ndim == 4 else offset[:, None, :])
        return _decoupled_attention(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask,
            temb,
            user_keys=cond.user_keys[self.layer_index],
            user_values=cond.user_values[self.layer_index],
            scale=cond.scale,
        )


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _decoupled_attention(
    attn: "Attention",
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    temb: torch.Tensor | None,
    user_keys: torch.Tensor,
    user_values: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Stock scaled-dot-product cross-attention with a second attention over the user tokens.

    ``user_keys``/``user_values``: (B, N, inner_dim), already projected by the adapter.
    Follows diffusers' ``AttnProcessor2_0`` step for step (norms, masks, residual, rescale).
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, context_len, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)

    query = _split_heads(attn.to_q(hidden_states), attn.heads)
    key = _split_heads(attn.to_k(context), attn.heads)
    value = _split_heads(attn.to_v(context), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    text_out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)

    user_key = _split_heads(user_keys.to(query.dtype), attn.heads)
    user_value = _split_heads(user_values.to(query.dtype), attn.heads)
    user_out = F.scaled_dot_product_attention(query, user_key, user_value)

    out = text_out + scale * user_out
    out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
