"""Weight-only quantized modules: ``QuantLinear`` and stacked ``QuantExperts``.

Each quantized weight keeps the layout its CPU kernel wants, chosen once at construction:

- ``span``: any bits, codes in the span layout of ``ernie45.kernels.qgemm`` (our AVX-512 VNNI kernel)
  + ``scales``/``zeros [.., N, G]``; taken whenever the native kernels are available and the shape fits
  (groups a multiple of 64 columns, K a multiple of 64 * 8 / bits);
- ``int8``: per-channel symmetric int8 ``qweight [.., N, K]`` + ``scales [.., N]`` for
  ``aten._weight_int8pack_mm`` (when the native kernels are not available);
- ``int4``: ``qweight [.., N, K/2]`` in the int4 kernel's byte layout + ``scale_zeros [.., G, N, 2]`` for
  ``aten._weight_int4pack_mm_for_cpu`` (needs N % 64 == 0 and groups of 32..256);
- ``packed``: any bits, codes packed along K (``math.pack``) + ``scales``/``zeros [.., N, G]``; the
  portable layout (also what checkpoints store) and the fallback, dequantized per call.

Stored scales/zeros use the middle-code convention w = (code - 2**(bits-1)) * scale + zero
(``math.dequantize_mid``) in the compute dtype, so every layout converts to and from the portable one
bit-exactly.

Decode (few rows) runs the kernels: they read 1, 0.5 or 0.25 byte per weight instead of 2. The span kernel
quantizes the activations per 128 columns (64 for groups of 64) to int8 (as llama.cpp's Q8 activations; the
rows stay independent, so a row's result does not depend on its batch); the aten kernels keep them in bf16. A
span weight still computes where the kernels are off or absent (dequantize + GEMM), only slower. Prefill-size
inputs are compute bound and the kernels are slow there, so above ``KERNEL_MAX_ROWS`` rows the weight is
dequantized to the activation dtype and run by the ordinary GEMM. Shape suffixes: T rows (tokens), N out
features, K in features, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie45 import kernels
from ernie45.model import native
from ernie45.model.moe import Experts
from ernie45.quant import math as qm
from ernie45.quant.scheme import TensorScheme
from ernie45.utils import advise_huge_pages

KERNEL_MAX_ROWS = 16
"""Rows up to which the weight-only kernels beat dequantize + GEMM on this CPU (bench_quant measures it)."""


def quantize_tensor(w_NK: torch.Tensor, scheme: TensorScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize one [.., N, K] weight with its scheme -> (codes uint8, scales fp32, offsets fp32)."""
    g = scheme.group_for(w_NK.shape[-1])
    if scheme.method == "hqq":
        return qm.quantize_hqq(w_NK, scheme.bits, g)
    if scheme.method == "mse":
        return qm.quantize_mse(w_NK, scheme.bits, g)
    if scheme.method == "gptq":
        raise ValueError("method='gptq' needs calibration activations: use quantize_model(model, config, "
                         "calibration=token_ids) on a loaded full-precision model")
    return qm.quantize_rtn(w_NK, scheme.bits, g, scheme.symmetric)


class QWeight(nn.Module):
    """One quantized weight of logical shape ``lead + (N, K)`` (lead = () or (E,) for stacked experts)."""

    def __init__(self, lead: tuple[int, ...], n: int, k: int, scheme: TensorScheme, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.n, self.k, self.bits, self.scheme = n, k, scheme.bits, scheme
        self.group = scheme.group_for(k)
        if k % self.group:
            raise ValueError(f"a weight with {k} input features does not split into groups of {self.group}; "
                             f"choose a group size dividing {k} (or per-channel)")
        if k * self.bits % 8:
            raise ValueError(f"{k} input features do not pack into whole bytes at {self.bits} bits")
        cpu = torch.device(device or "cpu").type in ("cpu", "meta")
        self._zero_free: bool | None = None  # all zeros 0 (symmetric): the kernel skips them; set lazily
        self._ptrs: tuple | None = None  # the span kernel's pointers and strides; reset when buffers change
        if cpu and kernels.span_ok(k, self.bits, self.group) and kernels.available():
            self.layout = "span"
        elif cpu and self.bits == 8 and scheme.symmetric and self.group == k:
            self.layout = "int8"
        elif cpu and self.bits == 4 and qm.int4_kernel_ok(n, k, self.group):
            self.layout = "int4"
        else:
            self.layout = "packed"
        g = k // self.group
        kw = dict(device=device)
        if self.layout == "int8":
            self.register_buffer("qweight", torch.empty(*lead, n, k, dtype=torch.int8, **kw))
            self.register_buffer("scales", torch.empty(*lead, n, dtype=dtype, **kw))
        elif self.layout == "int4":
            self.register_buffer("qweight", torch.empty(*lead, n, k // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scale_zeros", torch.empty(*lead, g, n, 2, dtype=dtype, **kw))
        else:  # packed and span: the same buffers, codes in another order
            self.register_buffer("qweight", torch.empty(*lead, n, k * self.bits // 8, dtype=torch.uint8, **kw))
            self.register_buffer("scales", torch.empty(*lead, n, g, dtype=dtype, **kw))
            # Symmetric per-channel int8 has no zeros to store (as the int8 layout; the planner counts so).
            no_zeros = self.layout == "span" and self.bits == 8 and scheme.symmetric and g == 1
            self.register_buffer("zeros", None if no_zeros else torch.empty(*lead, n, g, dtype=dtype, **kw))
        advise_huge_pages(self.buffers(recurse=False))  # not written yet: they fault in as 2 MiB pages

    @property
    def dtype(self) -> torch.dtype:
        return (self.scale_zeros if self.layout == "int4" else self.scales).dtype

    def _at(self, name: str, i: int | None) -> torch.Tensor:
        t = getattr(self, name)
        return t if i is None else t[i]

    # ------------------------------------------------------------------------ portable <-> kernel layout
    @torch.no_grad()
    def set(self, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor, offsets_NG: torch.Tensor) -> None:
        """Store weight ``i`` of a stack (None: the only one) from a quantizer's codes, scales and offsets
        (w = code * scale + offset); the zero is rounded to the compute dtype after the shift."""
        mid = 2 ** (self.bits - 1)
        zeros = offsets_NG.float() + mid * scales_NG.float()
        self.set_stored(i, codes_NK, scales_NG.to(self.dtype), zeros.to(self.dtype))

    @torch.no_grad()
    def set_stored(self, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor, zeros_NG: torch.Tensor
                   ) -> None:
        """Store weight ``i`` from the portable form (codes [N, K] uint8, scales/zeros [N, G], middle-code)."""
        self._zero_free = self._ptrs = None
        if self.layout == "span":
            self._at("qweight", i).copy_(kernels.to_span(codes_NK, self.bits))
            self._at("scales", i).copy_(scales_NG)
            if self.zeros is not None:
                self._at("zeros", i).copy_(zeros_NG)
        elif self.layout == "int8":
            # symmetric: the zero is 0, so the signed value is code - 128.
            self._at("qweight", i).copy_((codes_NK.to(torch.int16) - 128).to(torch.int8))
            self._at("scales", i).copy_(scales_NG.reshape(self.n))
        elif self.layout == "int4":
            self._at("qweight", i).copy_(qm.to_int4_kernel_layout(codes_NK))
            self._at("scale_zeros", i).copy_(qm.int4_scale_zeros(scales_NG, zeros_NG))
        else:
            self._at("qweight", i).copy_(qm.pack(codes_NK, self.bits))
            self._at("scales", i).copy_(scales_NG)
            self._at("zeros", i).copy_(zeros_NG)

    def stored(self, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The portable (codes [N, K] uint8, scales [N, G], zeros [N, G]) of weight ``i``, bit-exact."""
        if self.layout == "int8":
            s = self._at("scales", i)[:, None]
            return (self._at("qweight", i).to(torch.int16) + 128).to(torch.uint8), s, torch.zeros_like(s)
        if self.layout == "int4":
            s, z = qm.int4_split_scale_zeros(self._at("scale_zeros", i))
            return qm.from_int4_kernel_layout(self._at("qweight", i)), s, z
        if self.layout == "span":
            s = self._at("scales", i)
            z = torch.zeros_like(s) if self.zeros is None else self._at("zeros", i)
            return kernels.from_span(self._at("qweight", i), self.bits), s, z
        return qm.unpack(self._at("qweight", i), self.bits), self._at("scales", i), self._at("zeros", i)

    def quantize_(self, i: int | None, w_NK: torch.Tensor) -> None:
        """Quantize a full-precision weight with this module's scheme and store it."""
        if tuple(w_NK.shape) != (self.n, self.k):
            raise ValueError(f"weight of shape {tuple(w_NK.shape)} given for a quantized [{self.n}, {self.k}]")
        self.set(i, *quantize_tensor(w_NK, self.scheme))

    def dequantize(self, i: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] the module computes with, in ``dtype`` (default: the scales' dtype)."""
        dtype = dtype or self.dtype
        if self.layout == "int8":
            return self._at("qweight", i).to(dtype) * self._at("scales", i)[:, None].to(dtype)
        return qm.dequantize_mid(*self.stored(i), self.bits, dtype=dtype)

    # --------------------------------------------------------------------------------------- compute
    def matmul(self, x_TK: torch.Tensor, i: int | None = None) -> torch.Tensor:
        """x @ W_i^T for x [..., K] -> [..., N], in x's dtype."""
        lead = x_TK.shape[:-1]
        x2 = x_TK.reshape(-1, self.k)
        rows = x2.shape[0]
        if self.layout == "span" and 0 < rows <= KERNEL_MAX_ROWS and x2.device.type == "cpu" and kernels.available():
            xk = x2 if x2.dtype in (torch.bfloat16, torch.float32) else x2.float()
            y = self._span_matmul(xk.contiguous(), 0 if i is None else i).to(x_TK.dtype)
        elif self.layout in ("int8", "int4") and rows <= KERNEL_MAX_ROWS and x2.device.type == "cpu":
            xk = x2.to(self.dtype).contiguous()
            if self.layout == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xk, self._at("qweight", i), self._at("scales", i))
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, self._at("qweight", i), self.group,
                                                               self._at("scale_zeros", i))
            y = y.to(x_TK.dtype)
        else:
            y = F.linear(x2, self.dequantize(i, x_TK.dtype))
        return y.reshape(*lead, self.n)

    def _span_matmul(self, x_MK: torch.Tensor, i: int) -> torch.Tensor:
        """The decode hot path: ``kernels.qgemm`` with the weight's pointers computed once (a call costs a few
        microseconds of Python instead of ~20)."""
        q0, qs, s0, ss, z0, zs, sb = self._kernel_ptrs()
        return kernels.qgemm_ptrs(x_MK, self.n, q0 + i * qs, self.bits, s0 + i * ss, z0 + i * zs if z0 else None,
                                  sb, self.group)

    def fused_args(self, x: torch.Tensor) -> tuple | None:
        """For ``kernels.fused_linears`` (which checks x's device, dtype and grad): :meth:`span_args` when this
        weight takes x's decode-size rows, else None."""
        if x.shape[-1] != self.k or not 0 < x.numel() <= KERNEL_MAX_ROWS * self.k:
            return None
        return self.span_args()

    def span_args(self) -> tuple | None:
        """(rows, codes, scales, zeros or 0, (bits, group, scales bf16)): the addresses the native kernels take, for
        a single span-layout weight without a bias; else None."""
        if self.layout != "span" or self.qweight.dim() != 2 or getattr(self, "bias", None) is not None:
            return None
        q0, _, s0, _, z0, _, sb = self._kernel_ptrs()
        return self.n, q0, s0, z0, (self.bits, self.group, sb)

    def _kernel_ptrs(self) -> tuple:
        p = self._ptrs
        q = self.qweight
        if p is None or p[0] != q.data_ptr():  # a deepcopy or unpickled module carries its original's pointers
            _, scales, zeros, _ = self.kernel_args()
            p = self._ptrs = (q.data_ptr(), q.stride(0) if q.dim() == 3 else 0, scales.data_ptr(),
                              scales.stride(0) * scales.element_size() if scales.dim() == 3 else 0,
                              0 if zeros is None else zeros.data_ptr(),
                              0 if zeros is None or zeros.dim() == 2 else zeros.stride(0) * zeros.element_size(),
                              int(scales.dtype == torch.bfloat16))
        return p

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self._ptrs = None  # .to() / .cuda() / .float() may replace the buffers
        return super()._apply(fn, recurse)

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """(codes, scales, zeros or None when all zero, group) of the span layout, for ``kernels.qmoe``."""
        if self._zero_free is None:
            self._zero_free = self.zeros is None or not bool(self.zeros.any())
        return self.qweight, self.scales, None if self._zero_free else self.zeros, self.group

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{self.k} -> {self.n}, {self.scheme.describe()}, layout={self.layout}"


class QuantLinear(QWeight):
    """Drop-in for ``nn.Linear`` with a weight-only quantized weight (bias kept in full precision)."""

    def __init__(self, in_features: int, out_features: int, scheme: TensorScheme, bias: bool = False,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__((), out_features, in_features, scheme, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: TensorScheme, dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize an existing ``nn.Linear``."""
        dtype = dtype or linear.weight.dtype
        q = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None, dtype,
                linear.weight.device)
        q.quantize_(None, linear.weight.detach())
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantExperts(Experts):
    """Stacked routed experts with quantized ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.

    Reuses ``Experts.forward`` (tokens sorted by expert, each selected expert once); only the per-expert
    matmuls change, so at batch 1 only the k selected experts' packed bytes are read."""

    def __init__(self, num_experts: int, hidden: int, width: int, scheme: TensorScheme,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 down_scheme: TensorScheme | None = None) -> None:
        """down_scheme: the down projection's own scheme when it differs (mixed-bit rules, GGUF files whose
        ffn_down_exps has another type); None = ``scheme``."""
        nn.Module.__init__(self)  # not Experts.__init__: no full-precision parameters
        self.num_experts, self.width, self.hidden = num_experts, width, hidden
        self.gate_up_proj = QWeight((num_experts,), 2 * width, hidden, scheme, dtype, device)
        self.down_proj = QWeight((num_experts,), hidden, width, down_scheme or scheme, dtype, device)

    @classmethod
    def from_experts(cls, experts: Experts, scheme: TensorScheme, dtype: torch.dtype | None = None,
                     down_scheme: TensorScheme | None = None) -> QuantExperts:
        """Quantize an existing ``Experts`` one expert at a time."""
        e, two_i, h = experts.gate_up_proj.shape
        dtype = dtype or experts.gate_up_proj.dtype
        q = cls(e, h, two_i // 2, scheme, dtype, experts.gate_up_proj.device, down_scheme)
        for i in range(e):
            q.gate_up_proj.quantize_(i, experts.gate_up_proj[i].detach())
            q.down_proj.quantize_(i, experts.down_proj[i].detach())
        return q

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Decode sizes on CPU: all selected experts in one native call (``kernels.qmoe``: the same products,
        roundings and ascending-expert sum as the per-expert path, without its per-expert torch ops)."""
        gu, dn = self.gate_up_proj, self.down_proj
        if (gu.layout == "span" and dn.layout == "span" and gu.bits == dn.bits
                and 0 < x_TH.shape[0] <= kernels.MOE_MAX_TOKENS
                and x_TH.device.type == "cpu" and x_TH.dtype in (torch.bfloat16, torch.float32)
                and gu.dtype == dn.dtype and kernels.available() and not kernels.needs_grad(x_TH)):
            return kernels.qmoe(x_TH, idx_TK, w_TK.to(x_TH.dtype), gu.bits, gu.kernel_args(), dn.kernel_args())
        return super().forward(x_TH, idx_TK, w_TK)

    def span_args(self) -> tuple | None:
        """(bits, scales bf16, gate_up (codes, scales, zeros or 0, group), down (the same)): the addresses of the
        stacks for the native decode layer, when both are in the span layout with one scheme; else None."""
        gu, dn = self.gate_up_proj, self.down_proj
        if gu.layout != "span" or dn.layout != "span" or gu.bits != dn.bits or gu.dtype != dn.dtype:
            return None
        (q0, _, s0, _, z0, _, sb), d = gu._kernel_ptrs(), dn._kernel_ptrs()
        return gu.bits, sb, (q0, s0, z0, gu.group), (d[0], d[2], d[4], dn.group)

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.matmul(x_TH, e).chunk(2, dim=-1)
        return self.down_proj.matmul(F.silu(gate) * up, e)


native.NATIVE_TYPES.update((QuantLinear, QuantExperts))  # the C decode layer reproduces their forward
