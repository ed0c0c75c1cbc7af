"""What every quantized weight layout offers (``WeightFormat``); one file per layout beside this one.

A format object describes how one ``QWeight`` (``ernie45.quant.modules``) of logical shape ``lead + (N, K)`` keeps
its codes, scales and zeros: the buffers it registers on the module (so ``.to()``, ``state_dict`` and hooks treat
them as any buffer), how the portable form (codes [N, K] uint8, scales/zeros [N, G] in the middle-code convention
w = (code - 2**(bits-1)) * scale + zero) goes in and comes back out bit-exactly, and the reference computation.
Checkpoints always hold the portable form (``ernie45.quant.load``), so a layout is a choice of this process only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ernie45.quant import math as qm
from ernie45.quant.scheme import TensorScheme


class WeightFormat:
    """One layout of a quantized weight. Subclasses set ``name`` and implement the methods marked below."""

    name: ClassVar[str]
    own_matmul: ClassVar[bool] = False
    """Whether :meth:`matmul` runs few-row inputs on the CPU (else the module dequantizes and runs the GEMM)."""

    def __init__(self, lead: tuple[int, ...], n: int, k: int, scheme: TensorScheme, group: int) -> None:
        self.lead, self.n, self.k, self.bits, self.scheme, self.group = lead, n, k, scheme.bits, scheme, group

    @classmethod
    def fits(cls, n: int, k: int, scheme: TensorScheme, group: int, device: torch.device) -> bool:
        """Whether this layout holds such a weight on ``device`` (and is worth choosing there)."""
        raise NotImplementedError

    def buffers(self, dtype: torch.dtype, device: torch.device | str | None) -> dict[str, torch.Tensor | None]:
        """The empty buffers of the layout by module attribute name (scales and zeros in ``dtype``)."""
        raise NotImplementedError

    def store(self, qw: nn.Module, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor,
              zeros_NG: torch.Tensor, rows: slice = slice(None)) -> None:
        """Write weight ``i`` of the stack (None: the only one) from the portable form; ``rows``: only those output
        rows (a converter filling a large weight a few rows at a time; starts on a multiple of 64 rows)."""
        raise NotImplementedError

    def load(self, qw: nn.Module, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The portable (codes [N, K] uint8, scales [N, G], zeros [N, G]) of weight ``i``, bit-exactly."""
        raise NotImplementedError

    def dtype(self, qw: nn.Module) -> torch.dtype:
        """The compute dtype (that of the scales)."""
        return qw.scales.dtype

    def dequantize(self, qw: nn.Module, i: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] in ``dtype``."""
        return qm.dequantize_mid(*self.load(qw, i), self.bits, dtype=dtype)

    def matmul(self, qw: nn.Module, x_MK: torch.Tensor, i: int | None) -> torch.Tensor:
        """x [M, K] (contiguous, in the compute dtype) @ W_i^T by an op of the layout's own (torch's weight-only
        kernels), for layouts with ``own_matmul``."""
        raise NotImplementedError

    def nbytes(self, qw: nn.Module) -> int:
        return sum(b.numel() * b.element_size() for b in qw.buffers(recurse=False))


def at(t: torch.Tensor, i: int | None) -> torch.Tensor:
    """Weight ``i`` of a stacked buffer (None: the buffer of a single weight)."""
    return t if i is None else t[i]
