"""``span``: the layout of the native CPU kernels (``ernie45.kernels.qgemm``, run by the ``cpu`` backend of
``ernie45.accel``): per span of 64 * (8 / bits) columns, byte j holds column j + 64 p in bits [p * bits, ...)
(``kernels.to_span``; 6-bit codes split into a 4-bit and a 2-bit span). Same buffers as ``packed``, codes in
another order; symmetric per-channel int8 keeps no zeros. Chosen on the CPU whenever the kernels run there and the
shape fits (groups a multiple of 64 columns, K a multiple of the span); torch computes it by dequantize + GEMM.

The byte layout is defined next to the C code that reads it (``ernie45.kernels``: pure torch packing functions,
and ``kernels`` imports nothing from ``quant``).
"""

from __future__ import annotations

import torch

from ernie45 import kernels
from ernie45.quant.formats.packed import PackedFormat
from ernie45.quant.scheme import TensorScheme


class SpanFormat(PackedFormat):
    name = "span"

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        return device.type in ("cpu", "meta") and kernels.span_ok(k, scheme.bits, group) and kernels.available()

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        out = super().buffers(dtype, device)
        if self.bits == 8 and self.scheme.symmetric and self.group == self.k:
            out["zeros"] = None  # symmetric per-channel int8: no zeros to store (the planner counts so)
        return out

    def pack(self, codes_NK: torch.Tensor) -> torch.Tensor:
        return kernels.to_span(codes_NK, self.bits)

    def unpack(self, packed_NP: torch.Tensor) -> torch.Tensor:
        return kernels.from_span(packed_NP, self.bits)
