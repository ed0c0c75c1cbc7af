"""Fine-grained activation recomputation: which modules keep only their inputs in forward and run again
in backward (ERNIE 4.5 technical report §3: recompute chosen per module to trade compute for memory).

Choices (``recompute`` in the recipe, one name or a list):

- ``none``: autograd keeps everything;
- ``attention``: each layer's attention block (q/k/v, RoPE, SDPA, o_proj) keeps its normed input only;
- ``experts``: each MoE layer's routed experts keep their input, routing indices and weights only
  (the gathered token copies, gate|up, the activation and the expert outputs are recomputed);
- ``mlp``: the dense MLPs and the shared experts;
- ``full``: each decoder layer keeps its input only (``gradient_checkpointing``).

Applied from outside by a class swap (``RecomputedAttention`` subclasses ``Attention``): parameter names,
checkpoints and the model file do not change. Apply it last, after ``parallelize`` (which swaps the
experts' class itself).

``AllocationMeter`` measures what a choice costs on a CPU (which has no allocator statistics): the
bytes of tensors the step's ops allocated and that are still alive, with their peak.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

from ernie45.model.attention import Attention
from ernie45.model.layers import SwiGLU
from ernie45.model.model import DecoderLayer
from ernie45.model.moe import Experts, MoE

CHOICES = ("none", "attention", "experts", "mlp", "full")

_SUBCLASSES: dict[type, type] = {}


def _recomputed(cls: type) -> type:
    """``cls`` whose forward runs under non-reentrant checkpointing while training."""
    if getattr(cls, "_recomputed", False):
        return cls
    if cls not in _SUBCLASSES:
        def forward(self, *args, **kwargs):  # noqa: ANN001, ANN202
            parent = super(sub, self).forward
            if self.training and torch.is_grad_enabled():
                return checkpoint(parent, *args, use_reentrant=False, **kwargs)
            return parent(*args, **kwargs)

        sub = type(f"Recomputed{cls.__name__}", (cls,), {"forward": forward, "_recomputed": True})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def parse_recompute(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise the recipe value to a sorted tuple of module kinds (empty for none); ValueError otherwise."""
    if value is None:
        return ()
    names = [value] if isinstance(value, str) else list(value)
    bad = [n for n in names if n not in CHOICES]
    if bad:
        raise ValueError(f"recompute={value!r}: unknown choice(s) {bad}; choose from {list(CHOICES)} or a list")
    kinds = set(names) - {"none"}
    if "none" in names and kinds:
        raise ValueError(f"recompute={value!r}: 'none' cannot be combined with {sorted(kinds)}")
    if "full" in kinds and len(kinds) > 1:
        raise ValueError(f"recompute={value!r}: 'full' already recomputes every module of a layer; use it alone")
    return tuple(sorted(kinds))


def apply_recompute(model: nn.Module, value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Swap the chosen modules of ``model`` (a full model or a pipeline stage) to recomputing ones, in
    place; returns the parsed choice."""
    kinds = parse_recompute(value)
    mods = model.submodules() if hasattr(model, "submodules") else model.modules()  # a Pipeline: its stages
    for m in list(mods):
        if ("full" in kinds and isinstance(m, DecoderLayer)) or ("attention" in kinds and isinstance(m, Attention)) \
                or ("experts" in kinds and isinstance(m, Experts)) \
                or ("mlp" in kinds and isinstance(m, SwiGLU)):
            m.__class__ = _recomputed(type(m))
    return kinds


def recomputed_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(type(m), "_recomputed", False)]


class AllocationMeter(TorchDispatchMode):
    """Bytes of tensor storage created by the ops run inside the context and still alive, with their
    peak (what ``torch.cuda.max_memory_allocated`` reports on a GPU; a CPU has no such counter). Sees
    forward, backward and recomputation alike. Storages alive before the context (``exclude``: the
    parameters) are not counted, even when an op writes into them in place."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live = 0
        self.peak = 0
        self._count: dict[int, int] = {}

    def _release(self, ptr: int, nbytes: int) -> None:
        self._count[ptr] -= 1
        if not self._count[ptr]:
            del self._count[ptr]
            self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if not ptr or ptr in self._exclude:
            return
        if ptr not in self._count:
            self._count[ptr] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._count[ptr] += 1
        weakref.finalize(t, self._release, ptr, nbytes)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def moe_blocks(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]
