"""Acceleration backends, applied to a built model from outside (the last pass: build -> quantize swap -> load ->
shard -> accelerate). The model (``ernie45.model``) and the quantized modules (``ernie45.quant``) stay plain torch,
the reference every backend is tested against; a backend swaps modules for native-backed subclasses
(``ernie45.accel.swap``), and gives the engine its paged attention (``ernie45.accel.attention``) and greedy argmax.

- ``accelerate(model, "cpu" | "torch" | "auto")``: swap in place, record the name as ``model.accel_backend``;
- ``backend_of(model)``: the applied backend (its ``attention(kv_cache)`` and ``argmax``);
- backends: ``torch`` (reference, always), ``cpu`` (``ernie45.kernels``, AVX-512 BF16/VNNI; ``ernie45.accel.cpu``).
"""

from ernie45.accel.attention import AttentionMetadata, AttentionStep, PagedAttention
from ernie45.accel.backend import BACKENDS, Backend, accelerate, backend_of, resolve_backend

__all__ = ["BACKENDS", "AttentionMetadata", "AttentionStep", "Backend", "PagedAttention", "accelerate",
           "backend_of", "resolve_backend"]
