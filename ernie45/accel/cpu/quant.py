"""Native-backed quantized modules (``ernie45.quant``) for the CPU backend: span-layout weights run ``kernels.qgemm``
(one weight), ``kernels.fused_linears`` (several reading one input) and ``kernels.qmoe`` (a MoE layer's selected
experts) at the row counts where ``ernie45.accel.cpu.choice`` measured them faster than dequantize + GEMM. The
other layouts and the other row counts take the quantized modules' own forward.

A weight's kernel arguments (addresses, strides, whether its zeros can be skipped) are computed once and kept until
its ``version`` or its codes' address changes (requantized in place, ``.to()``, a deepcopy).
"""

from __future__ import annotations

import torch

from ernie45 import kernels
from ernie45.accel.cpu import choice
from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight


def kernel_args(qw: QWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(codes, scales, zeros or None when all zero, group) of a span-layout weight, for ``kernels.qmoe``."""
    return _span(qw)[1]


def kernel_ptrs(qw: QWeight) -> tuple:
    """(codes, codes stride, scales, scales stride, zeros or 0, zeros stride, scales bf16): the addresses of a span
    weight (strides in bytes between the weights of a stack)."""
    return _span(qw)[2]


def _span(qw: QWeight) -> tuple:
    q = qw.qweight
    key = (qw.version, q.data_ptr())
    cached = qw.__dict__.get("_accel_span")
    if cached is None or cached[0] != key:
        zeros = qw.zeros if qw.zeros is not None and bool(qw.zeros.any()) else None
        scales = qw.scales
        args = (q, scales, zeros, qw.group)
        ptrs = (q.data_ptr(), q.stride(0) if q.dim() == 3 else 0, scales.data_ptr(),
                scales.stride(0) * scales.element_size() if scales.dim() == 3 else 0,
                0 if zeros is None else zeros.data_ptr(),
                0 if zeros is None or zeros.dim() == 2 else zeros.stride(0) * zeros.element_size(),
                int(scales.dtype == torch.bfloat16))
        cached = qw.__dict__["_accel_span"] = (key, args, ptrs)
    return cached


def span_args(qw: QWeight) -> tuple | None:
    """(rows, codes, scales, zeros or 0, (bits, group, scales bf16)): the addresses the native kernels take, for a
    single span-layout weight without a bias; else None."""
    if qw.layout != "span" or qw.qweight.dim() != 2 or getattr(qw, "bias", None) is not None:
        return None
    q0, _, s0, _, z0, _, sb = kernel_ptrs(qw)
    return qw.n, q0, s0, z0, (qw.bits, qw.group, sb)


def experts_span_args(qx: QuantExperts) -> tuple | None:
    """(bits, scales bf16, gate_up (codes, scales, zeros or 0, group), down (the same), down's bits): the addresses
    of the stacks for the native decode layer, when both are in the span layout with scales of one dtype (their
    bits and groups may differ); else None."""
    gu, dn = qx.gate_up_proj, qx.down_proj
    if gu.layout != "span" or dn.layout != "span" or gu.dtype != dn.dtype:
        return None
    (q0, _, s0, _, z0, _, sb), d = kernel_ptrs(gu), kernel_ptrs(dn)
    return gu.bits, sb, (q0, s0, z0, gu.group), (d[0], d[2], d[4], dn.group), dn.bits


def _native_matmul(self: QWeight, x_TK: torch.Tensor, i: int | None = None) -> torch.Tensor:
    """``QWeight.matmul`` with decode-size inputs of a span weight through ``kernels.qgemm`` (its pointers computed
    once: a call costs a few microseconds of Python instead of ~20)."""
    rows = x_TK.numel() // self.k
    if (self.layout == "span" and choice.native(choice.qfamily(self.bits), rows) and x_TK.device.type == "cpu"
            and kernels.available()):
        x2 = x_TK.reshape(-1, self.k)
        xk = x2 if x2.dtype in (torch.bfloat16, torch.float32) else x2.float()
        q0, qs, s0, ss, z0, zs, sb = kernel_ptrs(self)
        i = 0 if i is None else i
        y = kernels.qgemm_ptrs(xk.contiguous(), self.n, q0 + i * qs, self.bits, s0 + i * ss,
                               z0 + i * zs if z0 else None, sb, self.group)
        return y.to(x_TK.dtype).reshape(*x_TK.shape[:-1], self.n)
    return QWeight.matmul(self, x_TK, i)


def _fused_args(self: QWeight, x: torch.Tensor) -> tuple | None:
    """For ``kernels.fused_linears`` (which checks x's device, dtype and grad): :func:`span_args` when this weight
    takes x's decode-size rows, else None."""
    if x.shape[-1] != self.k or not choice.native(choice.qfamily(self.bits), x.numel() // self.k):
        return None
    return span_args(self)


class NativeQWeight(QWeight):
    """A stacked expert weight (``QuantExperts.gate_up_proj`` / ``down_proj``) whose decode matmuls run natively."""

    reference = QWeight
    accelerates = ("matmul",)
    matmul = _native_matmul


class NativeQuantLinear(QuantLinear):
    """``QuantLinear`` whose decode matmuls run natively, and which joins ``kernels.fused_linears`` calls."""

    reference = QuantLinear
    accelerates = ("matmul", "fused_args")
    matmul = _native_matmul
    fused_args = _fused_args


class NativeQuantExperts(QuantExperts):
    """Decode sizes: all selected experts in one native call (``kernels.qmoe``: the products, roundings and
    ascending-expert sum of the per-expert path, without its per-expert torch ops)."""

    reference = QuantExperts
    accelerates = ("forward",)
    needs = {"forward": ("expert_forward",)}

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up_proj, self.down_proj
        if (gu.layout == "span" and dn.layout == "span"
                and choice.native("qexperts", x_TH.shape[0])
                and x_TH.device.type == "cpu" and x_TH.dtype in (torch.bfloat16, torch.float32)
                and gu.dtype == dn.dtype and kernels.available() and not kernels.needs_grad(x_TH)):
            return kernels.qmoe(x_TH, idx_TK, w_TK.to(x_TH.dtype), gu.bits, kernel_args(gu), kernel_args(dn),
                                dn.bits)
        return QuantExperts.forward(self, x_TH, idx_TK, w_TK)
