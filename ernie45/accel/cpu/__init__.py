"""The ``cpu`` backend: ``ernie45.kernels`` (AVX-512 BF16/VNNI C kernels, compiled on first use) behind module swaps.

- ``modules``: norms, bf16 linears, the SwiGLU and attention projections, the router, bf16 experts;
- ``quant``: span-layout quantized linears and experts (``ernie45.quant``'s modules);
- ``decode_layer``: a whole decoder layer as one call at a decode step;
- ``attention``: paged attention over the engine's cache (KV write, decode rows read in place).

Usable when the kernel library builds and loads on this machine (``kernels.available()``); then every module of a
class below is swapped, and each native forward still falls back to the reference where a call does not fit its
kernel (other dtypes, autograd) or where torch is faster for its row count (``choice``: measured per CPU, cached),
with the same result up to the summation order.
"""

from __future__ import annotations

import torch

from ernie45 import kernels
from ernie45.accel import swap
from ernie45.accel.attention import PagedAttention
from ernie45.accel.cpu import choice
from ernie45.accel.cpu.attention import CPUPagedAttention
from ernie45.accel.cpu.attention import usable as attention_usable
from ernie45.accel.cpu.decode_layer import NativeDecoderLayer
from ernie45.accel.cpu.modules import (
    NativeAttention,
    NativeExperts,
    NativeLinear,
    NativeRMSNorm,
    NativeRouter,
    NativeSwiGLU,
)
from ernie45.accel.cpu.quant import NativeQuantExperts, NativeQuantLinear, NativeQWeight

NATIVE: dict[type, type] = {c.reference: c for c in (
    NativeRMSNorm, NativeLinear, NativeSwiGLU, NativeAttention, NativeRouter, NativeExperts, NativeQWeight,
    NativeQuantLinear, NativeQuantExperts, NativeDecoderLayer)}
"""Reference class -> its native subclass (subclasses of these get derived ones: ``ernie45.accel.swap``)."""


def why_unusable() -> str:
    """Empty when the backend can run here; else why not (the kernel library's reason)."""
    return "" if kernels.available() else kernels.why_unavailable()


def apply(model: torch.nn.Module, decode_layers: bool = True) -> int:
    """Swap ``model``'s modules for native ones in place; returns how many. ``decode_layers=False`` leaves the
    decoder layers on their module path (each piece native, no whole-layer call: for comparisons)."""
    table = NATIVE if decode_layers else {k: v for k, v in NATIVE.items() if v is not NativeDecoderLayer}
    choice.ensure()  # which row counts each kernel family runs natively on this CPU (measured once per machine)
    return swap.swap(model, table)


def attention_backend(cache: object) -> PagedAttention:
    """The native paged attention over ``cache`` when it takes it (bf16 CPU cache), else the torch one."""
    return CPUPagedAttention(cache) if kernels.available() and attention_usable(cache) else PagedAttention(cache)


def argmax(logits_SV: torch.Tensor) -> torch.Tensor | None:
    """Greedy tokens: ``kernels.argmax`` over bf16/fp32 CPU logits (~10x torch's over a 103k vocabulary; the same
    index: bf16 -> fp32 is exact, first index on ties); None for other logits (the sampler takes torch's)."""
    if logits_SV.device.type == "cpu" and logits_SV.dtype in (torch.bfloat16, torch.float32) and kernels.available():
        return kernels.argmax(logits_SV)
    return None
