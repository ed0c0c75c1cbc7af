"""The ``triton`` backend: ``ernie45.kernels.triton`` behind module swaps, for models on a CUDA device.

- routed experts (bf16/fp16/fp32 ``Experts``, and ``QuantExperts`` in the portable ``packed`` layout at 8, 4 or 2
  bits: the codes stay packed on the device and are dequantized in registers) run as one fused MoE (two grouped
  GEMMs, the pairs sorted by expert on the device: no host synchronisation, no per-expert Python loop);
- quantized linears (``QuantLinear``, ``packed`` layout) run the Triton weight-only matmul (never a bf16 copy);
- RMSNorm is one kernel a row;
- paged attention reads the engine's cache through the block tables for any number of query tokens per sequence
  (decode, speculative verification, prefill chunks alike) in one launch a layer.

Each swapped forward falls back to the reference where a call does not fit (autograd, an unsupported layout or
dtype). On a machine without a GPU the backend runs under Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the tests compare it with the torch reference; it is not meant to be fast there.
"""

from __future__ import annotations

import torch
from torch import nn

from ernie45.accel import swap
from ernie45.accel.attention import AttentionMetadata, PagedAttention
from ernie45.kernels import triton as tk
from ernie45.model.layers import RMSNorm
from ernie45.model.moe import Experts
from ernie45.quant.modules import QuantExperts, QuantLinear


def why_unusable() -> str:
    """Empty when the backend can run here; else why not."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (it comes with torch's CUDA wheels; pip install triton)"
    if not (torch.cuda.is_available() or tk.interpreting()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly, for testing)"
    return ""


def takes(model: nn.Module) -> str:
    """Empty when the model's tensors are where the kernels run: a CUDA device (any device when interpreting)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda" or tk.interpreting():
        return ""
    return f"the triton backend runs models on a CUDA device; this one is on {dev}"


def _fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (not torch.is_grad_enabled() or not any(t.requires_grad for t in (x, *weights))) and all(
        t.device == x.device for t in weights) and (x.device.type == "cuda" or tk.interpreting())


def _packed(qw: nn.Module):  # noqa: ANN202 - an ExpertWeight, or None when the layout does not fit the kernel
    from ernie45.kernels.triton.moe import ExpertWeight

    if qw.layout != "packed" or qw.bits not in (8, 4, 2):
        return None
    zeros = qw.zeros
    if zeros is None:  # a symmetric scheme stores no zeros: the middle code is 0
        zeros = qw.__dict__.get("_accel_zeros")
        if zeros is None or zeros.shape != qw.scales.shape or zeros.device != qw.scales.device:
            zeros = qw.__dict__["_accel_zeros"] = torch.zeros_like(qw.scales)
    data, scales = qw.qweight, qw.scales
    if data.dim() == 2:  # a linear: one "expert"
        data, scales, zeros = data[None], scales[None], zeros[None]
    return ExpertWeight(data, qw.bits, scales, zeros)


class TritonRMSNorm(RMSNorm):
    reference = RMSNorm
    accelerates = ("forward",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _fits(x, self.weight) or x.dtype != self.weight.dtype:
            return RMSNorm.forward(self, x)
        from ernie45.kernels.triton.small_ops import add_rms_norm

        h = x.reshape(-1, x.shape[-1]).contiguous()
        return add_rms_norm(h, self.weight, self.eps).view(x.shape)


class TritonExperts(Experts):
    reference = Experts
    accelerates = ("forward",)
    needs = {"forward": ("expert_forward",)}

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up_proj, self.down_proj
        if not _fits(x_TH, gu, dn) or not x_TH.dtype == gu.dtype == dn.dtype or not x_TH.shape[0]:
            return Experts.forward(self, x_TH, idx_TK, w_TK)
        from ernie45.kernels.triton.moe import ExpertWeight, fused_moe

        return fused_moe(x_TH, idx_TK, w_TK, ExpertWeight(gu), ExpertWeight(dn))


class TritonQuantExperts(QuantExperts):
    reference = QuantExperts
    accelerates = ("forward",)
    needs = {"forward": ("expert_forward",)}

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        gu, dn = _packed(self.gate_up_proj), _packed(self.down_proj)
        if gu is None or dn is None or not _fits(x_TH, gu.data, dn.data) or not x_TH.shape[0]:
            return QuantExperts.forward(self, x_TH, idx_TK, w_TK)
        from ernie45.kernels.triton.moe import fused_moe

        return fused_moe(x_TH, idx_TK, w_TK, gu, dn)


class TritonQuantLinear(QuantLinear):
    reference = QuantLinear
    accelerates = ("forward",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _packed(self)
        if w is None or not _fits(x, w.data) or getattr(self, "bias", None) is not None:
            return QuantLinear.forward(self, x)
        from ernie45.kernels.triton.moe import linear

        return linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.n)


TRITON: dict[type, type] = {c.reference: c for c in (TritonRMSNorm, TritonExperts, TritonQuantExperts,
                                                     TritonQuantLinear)}


def apply(model: nn.Module) -> int:
    return swap.swap(model, TRITON)


class TritonPagedAttention(PagedAttention):
    """Paged attention by the Triton kernel: every query token of the step in one launch a layer."""

    name = "triton"

    def attend(self, meta: AttentionMetadata, layer_idx: int, q_TND: torch.Tensor, k_TKD: torch.Tensor,
               v_TKD: torch.Tensor) -> torch.Tensor:
        from ernie45.kernels.triton.attention import paged_attention

        self.write(layer_idx, k_TKD, v_TKD, meta.slot_mapping_T)
        dev = q_TND.device
        t = meta.__dict__.get("_triton")  # built once a step, shared by the layers
        if t is None:
            starts = [0]
            for q in meta.query_lens:
                starts.append(starts[-1] + q)
            t = meta.__dict__["_triton"] = (
                meta.block_tables_SB.to(device=dev, dtype=torch.int32).contiguous(),
                torch.tensor(meta.context_lens, dtype=torch.int32, device=dev),
                torch.tensor(starts, dtype=torch.int32, device=dev))
        tables, ctx, qstart = t
        return paged_attention(q_TND.contiguous(), self.cache.k[layer_idx], self.cache.v[layer_idx], tables, ctx,
                               qstart, self.scale)


def attention_backend(cache: object) -> PagedAttention:
    return TritonPagedAttention(cache)
