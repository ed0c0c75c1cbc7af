"""Triton GPU kernels: the fused MoE (bf16 and weight-only 8/4/2-bit with the dequantization in registers), paged
attention over the engine's block tables (any number of query tokens per sequence), and the small fused ops
(RMSNorm with the residual add, RoPE with the KV-cache write).

These are plain functions over tensors; the acceleration pass (``ernie45.accel``) decides where they replace the
torch reference. They run on CUDA devices, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set
before triton is imported), which is how the test suite checks them against the reference on a machine without
a GPU (fp32 there: the interpreter's bf16 arithmetic is not faithful).

Quantized weights use the portable layout of ``ernie45.quant.math`` unchanged: codes packed ``8 // bits`` to a
byte along the input dimension (first column in the lowest bits) and ``scales``/``zeros [.., N, G]`` with
``w = (code - 2**(bits-1)) * scale + zero``; a tile of ``BLOCK_K`` columns reads ``BLOCK_K * bits / 8`` bytes a
row, and the codes become bf16 in registers right before the tensor-core product.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """Triton is importable and can run on ``device``: a CUDA device, or any device under the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreting():
        return True
    dev = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")
