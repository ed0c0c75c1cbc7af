"""Weight-only quantized modules: ``QuantLinear`` and stacked ``QuantExperts``.

Each quantized weight (``QWeight``) keeps the layout its CPU kernel wants, chosen once at construction from
``ernie45.quant.formats`` (one class per layout: ``span`` for the native kernels, ``int8``/``int4`` for torch's
weight-only ops, the portable ``packed``). Stored scales/zeros use the middle-code convention
w = (code - 2**(bits-1)) * scale + zero (``math.dequantize_mid``) in the compute dtype, so every layout converts to
and from the portable one bit-exactly.

The modules' forward is the torch reference: few rows (decode) in the int8/int4 layouts run torch's weight-only
kernels, which read 1 or 0.5 byte per weight instead of 2; anything else dequantizes the weight to the activation
dtype and runs the ordinary GEMM. The span layout's native kernels (int8-quantized activations, llama.cpp's Q8
style) are supplied by the ``cpu`` backend of ``ernie45.accel``. Above ``KERNEL_MAX_ROWS`` rows (prefill, compute
bound) every path dequantizes. Shape suffixes: T rows (tokens), N out features, K in features, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.model.moe import Experts
from ernie45.quant import math as qm
from ernie45.quant.formats import choose_format
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
        self.version = 0
        """Bumped whenever the stored weight or its buffers change (set_stored, .to()): what a backend derived from
        them (kernel arguments, a fused layer's plan) is stale."""
        self.format = choose_format(lead, n, k, scheme, self.group, device)
        for name, t in self.format.buffers(dtype, device).items():
            self.register_buffer(name, t)
        advise_huge_pages(self.buffers(recurse=False))  # not written yet: they fault in as 2 MiB pages

    @property
    def layout(self) -> str:
        """The name of the weight's layout (``ernie45.quant.formats``): span, int8, int4 or packed."""
        return self.format.name

    @property
    def dtype(self) -> torch.dtype:
        return self.format.dtype(self)

    # ------------------------------------------------------------------------ portable <-> kernel layout
    @torch.no_grad()
    def set(self, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor, offsets_NG: torch.Tensor,
            rows: slice = slice(None)) -> None:
        """Store weight ``i`` of a stack (None: the only one) from a quantizer's codes, scales and offsets
        (w = code * scale + offset); the zero is rounded to the compute dtype after the shift."""
        mid = 2 ** (self.bits - 1)
        zeros = offsets_NG.float() + mid * scales_NG.float()
        self.set_stored(i, codes_NK, scales_NG.to(self.dtype), zeros.to(self.dtype), rows)

    @torch.no_grad()
    def set_stored(self, i: int | None, codes_NK: torch.Tensor, scales_NG: torch.Tensor, zeros_NG: torch.Tensor,
                   rows: slice = slice(None)) -> None:
        """Store weight ``i`` from the portable form (codes [N, K] uint8, scales/zeros [N, G], middle-code).
        rows: only that range of output rows, given as [rows, K] (a start on a multiple of 64 rows: the int4
        layout interleaves blocks of 64 rows), so a large weight can be filled piece by piece."""
        if rows != slice(None):
            start, stop, step = rows.indices(self.n)
            if step != 1 or start % 64 or codes_NK.shape[-2] != stop - start:
                raise ValueError(f"rows {rows} of a [{self.n}, {self.k}] weight: a contiguous range starting on a "
                                 f"multiple of 64 rows, matching the {codes_NK.shape[-2]} rows given")
        self.version += 1
        self.format.store(self, i, codes_NK, scales_NG, zeros_NG, rows)

    def stored(self, i: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The portable (codes [N, K] uint8, scales [N, G], zeros [N, G]) of weight ``i``, bit-exact."""
        return self.format.load(self, i)

    def quantize_(self, i: int | None, w_NK: torch.Tensor) -> None:
        """Quantize a full-precision weight with this module's scheme and store it."""
        if tuple(w_NK.shape) != (self.n, self.k):
            raise ValueError(f"weight of shape {tuple(w_NK.shape)} given for a quantized [{self.n}, {self.k}]")
        self.set(i, *quantize_tensor(w_NK, self.scheme))

    def dequantize(self, i: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] the module computes with, in ``dtype`` (default: the scales' dtype)."""
        return self.format.dequantize(self, i, dtype or self.dtype)

    # --------------------------------------------------------------------------------------- compute
    def matmul(self, x_TK: torch.Tensor, i: int | None = None) -> torch.Tensor:
        """x @ W_i^T for x [..., K] -> [..., N], in x's dtype: the layout's own op for few rows on the CPU (torch's
        int8/int4 weight-only kernels), else dequantize + GEMM (the reference; ``ernie45.accel`` backends run the
        span layout's kernel)."""
        lead = x_TK.shape[:-1]
        x2 = x_TK.reshape(-1, self.k)
        rows = x2.shape[0]
        if self.format.own_matmul and rows <= KERNEL_MAX_ROWS and x2.device.type == "cpu":
            y = self.format.matmul(self, x2.to(self.dtype).contiguous(), i).to(x_TK.dtype)
        else:
            y = F.linear(x2, self.dequantize(i, x_TK.dtype))
        return y.reshape(*lead, self.n)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self.version += 1  # .to() / .cuda() / .float() may replace the buffers
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Module signature
        self.version += 1  # load_state_dict writes (or, with assign=True, replaces) the buffers
        super()._load_from_state_dict(*args, **kwargs)

    def nbytes(self) -> int:
        return self.format.nbytes(self)

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

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.matmul(x_TH, e).chunk(2, dim=-1)
        return self.down_proj.matmul(F.silu(gate) * up, e)

