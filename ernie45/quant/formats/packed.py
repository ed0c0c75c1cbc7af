"""``packed``: codes packed along K (``math.pack``, first column in the lowest bits) + scales/zeros [.., N, G]. Any
bits, any device: the portable layout (also what checkpoints store) and the fallback, dequantized per call."""

from __future__ import annotations

import torch
from torch import nn

from ernie45.quant import math as qm
from ernie45.quant.formats.base import WeightFormat, at
from ernie45.quant.scheme import TensorScheme


class PackedFormat(WeightFormat):
    name = "packed"

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        return True

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        g = self.k // self.group
        return {"qweight": torch.empty(*self.lead, self.n, self.k * self.bits // 8, dtype=torch.uint8, device=device),
                "scales": torch.empty(*self.lead, self.n, g, dtype=dtype, device=device),
                "zeros": torch.empty(*self.lead, self.n, g, dtype=dtype, device=device)}

    def store(self, qw: nn.Module, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor,
              zeros_NG: torch.Tensor, rows: slice = slice(None)) -> None:
        at(qw.qweight, i)[rows].copy_(self.pack(codes_NK))
        at(qw.scales, i)[rows].copy_(scales_NG)
        if qw.zeros is not None:
            at(qw.zeros, i)[rows].copy_(zeros_NG)

    def load(self, qw: nn.Module, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = at(qw.scales, i)
        z = torch.zeros_like(s) if qw.zeros is None else at(qw.zeros, i)
        return self.unpack(at(qw.qweight, i)), s, z

    def pack(self, codes_NK: torch.Tensor) -> torch.Tensor:
        return qm.pack(codes_NK, self.bits)

    def unpack(self, packed_NP: torch.Tensor) -> torch.Tensor:
        return qm.unpack(packed_NP, self.bits)
