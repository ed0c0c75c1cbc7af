"""``int8``: per-channel symmetric int8 ``qweight [.., N, K]`` + ``scales [.., N]`` for torch's
``aten._weight_int8pack_mm`` (few rows on the CPU, activations in bf16). Chosen on the CPU for symmetric
per-channel 8-bit weights when the native kernels do not run (the ``span`` layout is checked first)."""

from __future__ import annotations

import torch
from torch import nn

from ernie45.quant.formats.base import WeightFormat, at
from ernie45.quant.scheme import TensorScheme


class AtenInt8Format(WeightFormat):
    name = "int8"
    own_matmul = True

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        return device.type in ("cpu", "meta") and scheme.bits == 8 and scheme.symmetric and group == k

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        return {"qweight": torch.empty(*self.lead, self.n, self.k, dtype=torch.int8, device=device),
                "scales": torch.empty(*self.lead, self.n, dtype=dtype, device=device)}

    def store(self, qw: nn.Module, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor,
              zeros_NG: torch.Tensor, rows: slice = slice(None)) -> None:
        # symmetric: the zero is 0, so the signed value is code - 128.
        at(qw.qweight, i)[rows].copy_((codes_NK.to(torch.int16) - 128).to(torch.int8))
        at(qw.scales, i)[rows].copy_(scales_NG.reshape(-1))

    def load(self, qw: nn.Module, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = at(qw.scales, i)[:, None]
        return (at(qw.qweight, i).to(torch.int16) + 128).to(torch.uint8), s, torch.zeros_like(s)

    def dequantize(self, qw: nn.Module, i: int | None, dtype: torch.dtype) -> torch.Tensor:
        return at(qw.qweight, i).to(dtype) * at(qw.scales, i)[:, None].to(dtype)

    def matmul(self, qw: nn.Module, x_MK: torch.Tensor, i: int | None) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x_MK, at(qw.qweight, i), at(qw.scales, i))
