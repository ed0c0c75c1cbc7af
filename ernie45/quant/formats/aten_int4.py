"""``int4``: ``qweight [.., N, K/2]`` in the byte layout of torch's ``aten._weight_int4pack_mm_for_cpu`` +
``scale_zeros [.., G, N, 2]`` (``math.to_int4_kernel_layout``). Chosen on the CPU for 4-bit weights with N % 64 == 0
and groups of 32..256 when the native kernels do not run (the ``span`` layout is checked first)."""

from __future__ import annotations

import torch
from torch import nn

from ernie45.quant import math as qm
from ernie45.quant.formats.base import WeightFormat, at
from ernie45.quant.scheme import TensorScheme


class AtenInt4Format(WeightFormat):
    name = "int4"
    own_matmul = True

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        return device.type in ("cpu", "meta") and scheme.bits == 4 and qm.int4_kernel_ok(n, k, group)

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        g = self.k // self.group
        return {"qweight": torch.empty(*self.lead, self.n, self.k // 2, dtype=torch.uint8, device=device),
                "scale_zeros": torch.empty(*self.lead, g, self.n, 2, dtype=dtype, device=device)}

    def dtype(self, qw: nn.Module) -> torch.dtype:
        return qw.scale_zeros.dtype

    def store(self, qw: nn.Module, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor,
              zeros_NG: torch.Tensor, rows: slice = slice(None)) -> None:
        at(qw.qweight, i)[rows].copy_(qm.to_int4_kernel_layout(codes_NK))  # whole blocks of 64 rows
        at(qw.scale_zeros, i)[:, rows].copy_(qm.int4_scale_zeros(scales_NG, zeros_NG))

    def load(self, qw: nn.Module, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, z = qm.int4_split_scale_zeros(at(qw.scale_zeros, i))
        return qm.from_int4_kernel_layout(at(qw.qweight, i)), s, z

    def matmul(self, qw: nn.Module, x_MK: torch.Tensor, i: int | None) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_MK, at(qw.qweight, i), self.group, at(qw.scale_zeros, i))
