"""Decode steps of a quantized model on CPU with one native call per decoder layer (``kernels.decode_layer``).

At batch 1 a decoder layer is ~15 calls of small ops and matmul kernels; with the matmuls at memory speed, the
Python between them (module calls, checks, tensor allocations: ~0.2 ms a layer here) is the largest cost left.
The C function runs the same kernels in the module code's order and roundings with nothing between them.

A layer goes native when every piece has a native form: quantized span-layout linears without biases (q/k/v of one
scheme, the MLP's or shared experts' gate/up of one scheme), quantized routed experts, bf16 norms, the decode
attention's head shapes. Anything else (a bf16 or fp32 model, biases, autograd, prefill, router records) takes the
module path, which gives the same result. A layer's plan (its weights' addresses) is built once and rebuilt when
a weight's storage moves. A forward hook on any of a layer's modules (or a global one) keeps the layer on the
module path, where the hook runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ernie45 import kernels
from ernie45.model.attention import Attention
from ernie45.model.layers import RMSNorm, SwiGLU
from ernie45.model.moe import MoE, Router

_enabled = True

NATIVE_TYPES: set[type] = set()
"""Weight modules whose forward the C layer reproduces, by exact type (``ernie45.quant`` registers QuantLinear and
QuantExperts): a subclass that changes the forward (an all-reduce, LoRA) keeps its layer on the module path."""


@contextlib.contextmanager
def use_native_layers(flag: bool) -> Iterator[None]:
    """Turn the native decode layers on or off inside a block (the module path then runs every layer; tests compare
    the two)."""
    global _enabled
    old, _enabled = _enabled, flag
    try:
        yield
    finally:
        _enabled = old


def build_plan(layer: torch.nn.Module) -> kernels.LayerPlan | None:
    """The native plan of a ``DecoderLayer``, or None when some piece has no native form."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if (type(attn) is not Attention or type(mlp) not in (MoE, SwiGLU) or any(type(n) is not RMSNorm for n in norms)
            or (type(mlp) is MoE) != layer.is_moe):
        return None
    h = norms[0].weight.shape[0]
    if (any(n.weight.dtype != torch.bfloat16 or n.weight.shape != (h,) for n in norms) or h % 16
            or norms[1].eps != norms[0].eps):
        return None
    d, nq, nkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    if d % 16 or d > 128 or nq % nkv or nq // nkv > 8:
        return None

    def args(*mods: torch.nn.Module) -> list:
        return [m.span_args() if type(m) in NATIVE_TYPES else None for m in mods]

    qkv, o = kernels.qset(args(attn.q_proj, attn.k_proj, attn.v_proj)), kernels.qset(args(attn.o_proj))
    if (qkv is None or o is None or list(qkv.args[:3]) != [nq * d, nkv * d, nkv * d] or o.args[0] != h
            or attn.q_proj.k != h or attn.o_proj.k != nq * d):  # the C side sizes its buffers from these
        return None
    plan = kernels.LayerPlan(H=h, NQ=nq, NKV=nkv, D=d, eps=norms[0].eps, scale=d ** -0.5, qkv=qkv, o=o,
                             in_norm=norms[0].weight.data_ptr(), post_norm=norms[1].weight.data_ptr())
    swiglu = mlp.shared_experts if layer.is_moe else mlp
    if swiglu is not None and type(swiglu) is not SwiGLU:
        return None
    if swiglu is not None:
        gu, dn = kernels.qset(args(swiglu.gate_proj, swiglu.up_proj)), kernels.qset(args(swiglu.down_proj))
        if (gu is None or dn is None or gu.args[0] != gu.args[1] or dn.args[0] != h or swiglu.gate_proj.k != h
                or swiglu.down_proj.k != gu.args[0]):
            return None
        plan.gate_up, plan.down, plan.W = gu, dn, swiglu.gate_proj.n
    if layer.is_moe:
        experts = mlp.experts.span_args() if type(mlp.experts) in NATIVE_TYPES else None
        gate = mlp.gate
        if (experts is None or type(gate) is not Router or gate.weight.dtype != torch.float32
                or not gate.weight.is_contiguous() or gate.weight.shape[1] != h or mlp.experts.hidden != h):
            return None
        plan.E, plan.K, plan.I, plan.norm_min = gate.weight.shape[0], gate.top_k, mlp.experts.width, gate.norm_min
        plan.router_w, plan.router_b = gate.weight.data_ptr(), gate.e_score_correction_bias.data_ptr()
        plan.ebits, plan.es_bf16 = experts[0], experts[1]
        plan.egu[:], plan.edn[:] = experts[2], experts[3]
    return plan


_generation = 0
"""Bumped whenever any module, parameter or buffer is assigned anywhere (torch's global registration hooks): a
cached plan is rebuilt after a layer's linears are swapped (quantize_model) or a weight replaced."""


def _bump(*args: object) -> None:
    global _generation
    _generation += 1


for _register in (torch.nn.modules.module.register_module_module_registration_hook,
                  torch.nn.modules.module.register_module_parameter_registration_hook,
                  torch.nn.modules.module.register_module_buffer_registration_hook):
    _register(_bump)


class _Cached:
    """A layer's plan and what it was built from: the generation, its quantized weights' pointer tuples (reset by a
    ``.to()`` or a new quantization) and the storage addresses of its full-precision tensors."""

    __slots__ = ("generation", "mods", "plan", "qweights", "tensors")

    def __init__(self, layer: torch.nn.Module) -> None:
        self.generation = _generation
        self.plan = build_plan(layer)
        self.mods = mods = list(layer.modules())
        self.qweights = [(m, m._ptrs) for m in mods if getattr(m, "_ptrs", None) is not None]
        self.tensors = [(t, t.data_ptr()) for m in mods if not hasattr(m, "_ptrs")
                        for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]

    def valid(self) -> bool:
        return (self.generation == _generation and all(m._ptrs is p for m, p in self.qweights)
                and all(t.data_ptr() == a for t, a in self.tensors))

    def hooked(self) -> bool:
        """A forward hook on any module of the layer: it must see the module calls, so the layer runs them."""
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.mods)


def layer_plans(layers: torch.nn.ModuleList) -> list[kernels.LayerPlan | None]:
    """Each layer's plan, cached on the layer; rebuilt when a module or tensor was assigned since, or a weight's
    storage moved."""
    if _global_hooks():
        return [None] * len(layers)
    plans = []
    for layer in layers:
        cached = layer.__dict__.get("_native_plan")
        if cached is None or not cached.valid():
            cached = layer.__dict__["_native_plan"] = _Cached(layer)
        plans.append(None if cached.hooked() else cached.plan)
    return plans


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


def step_ok(h_BTH: torch.Tensor) -> bool:
    """Whether this forward's hidden states can take native layers: one row of at most ``SMALL_MAX_ROWS`` bf16 CPU
    tokens, without autograd."""
    return _enabled and h_BTH.shape[0] == 1 and not torch.is_grad_enabled() and kernels.small_ok(h_BTH)
