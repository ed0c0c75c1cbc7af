"""Grouped-query attention (spec §2.4) with two paths.

- Dense causal path (``cache is None``): SDPA over [B, T] with an optional padding mask. Used for
  parity tests and training.
- Cache path: the caller passes an object with ``attend(layer_idx, q, k, v) -> out`` that writes the
  new keys/values into its cache and attends over it (the engine passes its attention backend's context
  for the step, ``ernie45.accel.attention``). The model imports neither; the metadata travels with the step.

Shape suffixes: B batch, T tokens, N query heads, K kv heads, D head_dim, H hidden.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.config import ModelConfig
from ernie45.model.layers import Linear, apply_rope


class AttentionCache(Protocol):
    """What the cache path needs: store k/v for the current tokens, return attention over the cache.

    The engine passes one such object per step (its attention backend's step context, ``ernie45.accel.attention``):
    the step's metadata travels with it, never parked on the cache."""

    def attend(self, layer_idx: int, q_TND: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
               ) -> torch.Tensor:  # -> [T, N, D]
        ...


def causal_padding_mask(attention_mask_BT: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal, and padded keys hidden. A fully hidden row (a left-pad
    query) keeps the finite minimum rather than -inf so it never turns into NaN (as transformers)."""
    b, t = attention_mask_BT.shape
    causal_TT = torch.ones(t, t, dtype=torch.bool, device=attention_mask_BT.device).tril()
    allowed_BTT = causal_TT[None] & attention_mask_BT.bool()[:, None, :]
    mask = torch.zeros(b, 1, t, t, dtype=dtype, device=attention_mask_BT.device)
    return mask.masked_fill(~allowed_BTT[:, None], torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(h, q, bias=config.use_bias)
        self.k_proj = Linear(h, kv, bias=config.use_bias)
        self.v_proj = Linear(h, kv, bias=config.use_bias)
        self.o_proj = Linear(q, h, bias=config.use_bias)

    def forward(
        self,
        x_BTH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        b, t, _ = x_BTH.shape
        q = self.q_proj(x_BTH).view(b, t, -1, self.head_dim)  # [B, T, N, D]
        k = self.k_proj(x_BTH).view(b, t, -1, self.head_dim)  # [B, T, K, D]
        v = self.v_proj(x_BTH).view(b, t, -1, self.head_dim)
        # cos/sin: [B, T, D/2] -> broadcast over heads
        q, k = apply_rope(q, cos[:, :, None], sin[:, :, None]), apply_rope(k, cos[:, :, None], sin[:, :, None])
        return self.o_proj(self.attend(q, k, v, mask, cache).reshape(b, t, -1))

    def attend(self, q_BTND: torch.Tensor, k_BTKD: torch.Tensor, v_BTKD: torch.Tensor, mask: torch.Tensor | None,
               cache: AttentionCache | None) -> torch.Tensor:
        """Attention of the rotated q over k/v (and the cache's context when given) -> [B, T, N, D]."""
        b = q_BTND.shape[0]
        q, k, v = q_BTND, k_BTKD, v_BTKD
        if cache is not None:
            if b != 1:
                raise ValueError("the cache path takes the batch flattened into one row: [1, T]")
            out = cache.attend(self.layer_idx, q[0], k[0], v[0])[None]  # [1, T, N, D]
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5,
                enable_gqa=self.num_heads != self.num_kv_heads,
            ).transpose(1, 2)  # [B, T, N, D]
        return out
