"""The native CPU paged attention: keys/values written with one call (``kernels.kv_write``), decode rows attended
over the cache in place through their block tables (``kernels.decode_attention``: no gathered copy of the keys).
Prefill chunks take the torch backend's SDPA. A decode-only step also hands the native decoder layers
(``ernie45.accel.cpu.decode_layer``) the cache arguments of the whole step (:attr:`CPUAttentionStep.native_decode`).
"""

from __future__ import annotations

import torch

from ernie45 import kernels
from ernie45.accel.attention import AttentionMetadata, AttentionStep, PagedAttention


class CPUAttentionStep(AttentionStep):
    """A step of :class:`CPUPagedAttention`. ``native_decode``: the slots, block tables and context lengths of a step
    made of decode rows only (``kernels.DecodeStep``), for the decoder layers that run as one native call; else
    None."""

    def __init__(self, backend: CPUPagedAttention, meta: AttentionMetadata) -> None:
        super().__init__(backend, meta)
        cache = backend.cache
        self.native_decode = None
        if meta.num_decode_tokens and meta.num_decode_tokens == meta.slot_mapping_T.shape[0] and kernels.available():
            self.native_decode = kernels.DecodeStep(meta.slot_mapping_T, meta.decode_tables, meta.decode_lens,
                                                    cache.capacity_tokens, cache.block_size, *backend.addresses)


class CPUPagedAttention(PagedAttention):
    """Paged attention over a bf16 CPU cache with the native kernels (``ernie45.accel.cpu.attention_backend`` picks
    it only for such a cache)."""

    name = "cpu"

    def __init__(self, cache: object) -> None:
        super().__init__(cache)
        self.addresses = ([t.data_ptr() for t in cache.k], [t.data_ptr() for t in cache.v])

    def step(self, meta: AttentionMetadata) -> CPUAttentionStep:
        return CPUAttentionStep(self, meta)

    def write(self, layer_idx: int, k_TKD: torch.Tensor, v_TKD: torch.Tensor, slots_T: torch.Tensor) -> None:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if k_TKD.dtype == torch.bfloat16 and kernels.available():
            kernels.kv_write(k_TKD, v_TKD, kc, vc, slots_T)  # one call, no dispatcher round trips
        else:
            super().write(layer_idx, k_TKD, v_TKD, slots_T)

    def decode(self, meta: AttentionMetadata, layer_idx: int, q_RND: torch.Tensor, out_dtype: torch.dtype
               ) -> torch.Tensor:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if kernels.decode_attention_ok(q_RND, kc):
            return kernels.decode_attention(q_RND, kc, vc, meta.decode_tables, meta.decode_lens, self.scale, out_dtype)
        return super().decode(meta, layer_idx, q_RND, out_dtype)


def usable(cache: object) -> bool:
    """Whether the native attention takes this cache: bf16 on CPU, head_dim a multiple of 16 up to 128."""
    k = cache.k[0]
    return k.dtype == torch.bfloat16 and k.device.type == "cpu" and k.shape[-1] % 16 == 0 and k.shape[-1] <= 128
