"""Backends by name and the ``accelerate`` pass.

A backend is a set of module swaps (``apply``), a paged attention implementation for the engine's KV cache
(``attention``) and a greedy-token function for the sampler (``argmax``). ``torch`` is the reference: no swap,
torch's ops, always usable. ``cpu`` is ``ernie45.accel.cpu``. A GPU backend adds an entry to ``BACKENDS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ernie45.accel import cpu, swap
from ernie45.accel.attention import PagedAttention

log = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "cpu", "triton"]


@dataclass(frozen=True)
class Backend:
    name: str
    why_unusable: Callable[[], str]
    """Empty when the backend runs on this machine; else the reason."""
    apply: Callable[..., int]
    """apply(model, **options) swaps the model's modules in place; returns how many."""
    attention: Callable[[object], PagedAttention]
    """attention(kv_cache): the paged attention over an engine cache."""
    argmax: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    """argmax(logits [S, V]) -> int64 [S], or None where it does not take these logits; None: torch's."""
    takes: Callable[[nn.Module], str] | None = None
    """takes(model): empty when the model is where this backend runs, else why not; None: CPU models only."""

    def usable(self) -> bool:
        return not self.why_unusable()


def _triton() -> Backend:
    from ernie45.accel import triton

    return Backend("triton", triton.why_unusable, triton.apply, triton.attention_backend, None, triton.takes)


def _triton_why() -> str:
    import importlib.util

    return "" if importlib.util.find_spec("triton") is not None else "the triton package is not installed"


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", lambda: "", lambda model: 0, PagedAttention, takes=lambda model: ""),
    "cpu": Backend("cpu", cpu.why_unusable, cpu.apply, cpu.attention_backend, cpu.argmax),
}
if _triton_why() == "":  # imported only where triton is installed (it comes with torch's CUDA wheels)
    BACKENDS["triton"] = _triton()


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))


def resolve_backend(backend: str, model: nn.Module) -> str:
    """The backend name ``backend`` means for ``model``. "auto": the one already applied to the model, else ``cpu``
    when its kernels run here and the model is on the CPU, else ``torch``. An unknown or unusable name is a
    ValueError saying why."""
    if backend == "auto":
        applied = getattr(model, "accel_backend", None)
        if applied is not None:
            return applied
        if "triton" in BACKENDS and next(model.parameters()).device.type == "cuda" and BACKENDS["triton"].usable():
            return "triton"
        return "cpu" if BACKENDS["cpu"].usable() and _on_cpu(model) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {['auto', *BACKENDS]}")
    why = BACKENDS[backend].why_unusable()
    if why:
        raise ValueError(f"backend={backend!r} cannot run here: {why}; use backend='torch' (or 'auto')")
    takes = BACKENDS[backend].takes
    where = next(model.parameters()).device
    if takes is not None:
        why = takes(model)
    else:
        why = "" if _on_cpu(model) else f"it runs CPU models; this one is on {where}"
    if why:
        raise ValueError(f"backend={backend!r} cannot run this model: {why}; use backend='torch' (or 'auto')")
    return backend


def accelerate(model: nn.Module, backend: str = "auto", **options: object) -> nn.Module:
    """Apply a backend to a built (quantized, loaded, sharded) model in place and return it: the last pass, after
    build -> quantize swap -> load -> shard. Modules swapped by another backend are put back first, so
    ``accelerate(model, "torch")`` restores the reference modules. The name is recorded as ``model.accel_backend``.
    ``options`` go to the backend's ``apply`` (cpu: ``decode_layers=False`` keeps layers on the module path).
    "auto" leaves a model that has a backend as it is; naming a backend applies it afresh (after the model changed:
    modules quantized or replaced)."""
    if backend == "auto" and getattr(model, "accel_backend", None) is not None and not options:
        return model
    name = resolve_backend(backend, model)
    reverted = swap.revert(model)
    swapped = BACKENDS[name].apply(model, **options)
    model.accel_backend = name
    log.info("backend %s: %d modules native (%d reverted first)", name, swapped, reverted)
    return model


def backend_of(model: nn.Module) -> Backend:
    """The backend applied to ``model`` (``torch`` when none was)."""
    return BACKENDS[getattr(model, "accel_backend", None) or "torch"]


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8")
"""The CPU features the backends' choice depends on (AMX reaches torch's matmuls through oneDNN)."""


def describe(measure: bool = False) -> dict:
    """What ``ernie45 info --backend`` prints: the CPU and its features, each backend and why it cannot run, and the
    CPU backend's per-family table (measured now with ``measure``, else the cached one, measuring once if none)."""
    from ernie45 import kernels
    from ernie45.accel.cpu import choice, onednn

    model, flags = kernels._cpu_info()
    out: dict = {
        "cpu": model or "unknown",
        "threads": torch.get_num_threads(),
        "features": {f: f in flags for f in ISA_FLAGS},
        "torch": torch.__version__,
        "backends": {name: b.why_unusable() or "usable" for name, b in BACKENDS.items()},
        "native_kernels": "built" if kernels.available() else f"unavailable: {kernels.why_unavailable()}",
        "kernel_builds": {isa: kernels.isa_why_not(isa) or "runs here" for isa in kernels.ISAS},
    }
    try:
        out["onednn_bf16_matmul"] = onednn.matmul_impl()["impl"] or "not used (torch's own kernels)"
    except RuntimeError as e:  # the probe runs in a child process; a failure there is reported, not raised
        out["onednn_bf16_matmul"] = f"unknown: {e}"
    if kernels.available():
        c = choice.ensure("measure" if measure else None)
        out["choice"] = {"source": c.source, "file": c.path,
                         "native_rows": {f: [b for b, n in zip(choice.BUCKETS, c.native[f]) if n]
                                         for f in choice.FAMILIES},
                         "timings_us": c.timings}
        out["choice_table"] = c.table()
        out["active_isa"] = kernels.active_isa()
    return out
