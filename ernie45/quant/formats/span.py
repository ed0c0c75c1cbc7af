"""``span``: the layout of the native CPU kernels (``ernie45.kernels.qgemm``, run by the ``cpu`` backend of
``ernie45.accel``): 8, 4 and 2 bits in tiles of 16 rows, scales and zeros tiled with them; 6 bits row by row (a
4-bit and a 2-bit span: per span of 64 * (8 / bits) columns, byte j holds column j + 64 p in bits [p * bits, ...))
(``kernels.to_span``, ``kernels.span_scales``). Same buffers as ``packed``, codes and scales in another order;
symmetric per-channel int8 keeps no zeros. Chosen on the CPU whenever the kernels run there and the shape fits
(groups a multiple of 64 columns, K a multiple of the span, N a multiple of 16 but for 6 bits); torch computes it
by dequantize + GEMM.

The byte layout is defined next to the C code that reads it (``ernie45.kernels``: pure torch packing functions,
and ``kernels`` imports nothing from ``quant``).
"""

from __future__ import annotations

import torch
from torch import nn

from ernie45 import kernels
from ernie45.quant.formats.base import at
from ernie45.quant.formats.packed import PackedFormat
from ernie45.quant.scheme import TensorScheme


class SpanFormat(PackedFormat):
    name = "span"

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        return device.type in ("cpu", "meta") and kernels.span_ok(k, scheme.bits, group, n) and kernels.available()

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        out = super().buffers(dtype, device)
        if self.bits == 8 and self.scheme.symmetric and self.group == self.k:
            out["zeros"] = None  # symmetric per-channel int8: no zeros to store (the planner counts so)
        return out

    def store(self, qw: nn.Module, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor,
              zeros_NG: torch.Tensor, rows: slice = slice(None)) -> None:
        dest = at(qw.qweight, i)[rows]  # rows: whole tiles (starts on 64 rows); contiguous: whole rows of a buffer
        kernels.to_span(codes_NK, self.bits, out=dest)  # 8/4/2 bits straight into the buffer: no packed temporary
        at(qw.scales, i)[rows].copy_(kernels.span_scales(scales_NG, self.bits))
        if qw.zeros is not None:
            at(qw.zeros, i)[rows].copy_(kernels.span_scales(zeros_NG, self.bits))

    def load(self, qw: nn.Module, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = kernels.from_span_scales(at(qw.scales, i), self.bits)
        z = torch.zeros_like(s) if qw.zeros is None else kernels.from_span_scales(at(qw.zeros, i), self.bits)
        return self.unpack(at(qw.qweight, i)), s, z

    def pack(self, codes_NK: torch.Tensor) -> torch.Tensor:
        return kernels.to_span(codes_NK, self.bits)

    def unpack(self, packed_NP: torch.Tensor) -> torch.Tensor:
        return kernels.from_span(packed_NP, self.bits)
