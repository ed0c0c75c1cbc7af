"""A decoder layer as one native call at a decode step (``kernels.decode_layer``).

At batch 1 a decoder layer is ~15 calls of small ops and matmul kernels; with the matmuls at memory speed, the
Python between them (module calls, checks, tensor allocations: ~0.2 ms a layer here) is the largest cost left.
The C function runs the same kernels in the module code's order and roundings with nothing between them.

A layer runs natively when every piece has a native form: linears without biases, quantized in the span layout or
bf16 (q/k/v of one scheme, the MLP's or shared experts' gate/up of one scheme), routed experts quantized or bf16,
bf16 norms, the decode attention's head shapes; when ``ernie45.accel.cpu.choice`` has the native kernels of each
family at the step's row count; and when the step is one the CPU attention backend prepared for it (``cache`` is its
step context with decode rows only: one row per query token, ``ernie45.accel.cpu.attention``). Anything else (an
fp32 model, biases, autograd, prefill, router records) takes the module path, which gives the same result. A bf16
layer calls the kernels its module path calls (``bgemm`` per linear, ``bmoe``), so the two agree as the quantized
ones do.

A layer's plan (its weights' addresses) is built on first use and rebuilt when its signature changes: a module of
the layer replaced or re-classed (``quantize_model``), a parameter or buffer replaced or moved (``.to()``,
``.float()``), a quantized weight rewritten (its ``version``). A forward hook on any of its modules (or a global
one) keeps the layer on the module path, where the hook runs.
"""

from __future__ import annotations

from operator import attrgetter

import torch
from torch import nn

from ernie45 import kernels
from ernie45.accel.cpu import choice
from ernie45.accel.cpu.modules import (
    NativeAttention,
    NativeExperts,
    NativeLinear,
    NativeRMSNorm,
    NativeRouter,
    NativeSwiGLU,
)
from ernie45.accel.cpu.quant import NativeQuantExperts, NativeQuantLinear, experts_span_args, span_args
from ernie45.model.attention import Attention
from ernie45.model.layers import Linear, RMSNorm, SwiGLU
from ernie45.model.model import DecoderLayer
from ernie45.model.moe import Experts, MoE, Router
from ernie45.quant.modules import QuantExperts, QuantLinear, QWeight

# Exact types whose forward the C layer reproduces: a subclass that changes the forward (an all-reduce, LoRA) keeps
# its layer on the module path.
_ATTENTION = (Attention, NativeAttention)
_NORM = (RMSNorm, NativeRMSNorm)
_SWIGLU = (SwiGLU, NativeSwiGLU)
_ROUTER = (Router, NativeRouter)
_LINEAR = (QuantLinear, NativeQuantLinear)
_EXPERTS = (QuantExperts, NativeQuantExperts)
_BLINEAR = (Linear, NativeLinear)
_BEXPERTS = (Experts, NativeExperts)


def _bf16_ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() and t.shape[-1] % 32 == 0
               for t in ts)  # parameters that require grad too: the layer runs natively only without autograd


def bf16_args(m: nn.Module) -> tuple | None:
    """A bf16 linear without a bias as a QSet member of bits 16: (rows, weight address, 0, 0, (16, 0, 0))."""
    if type(m) not in _BLINEAR or m.bias is not None or m.weight.dim() != 2 or not _bf16_ok(m.weight):
        return None
    return m.weight.shape[0], m.weight.data_ptr(), 0, 0, (16, 0, 0)


def bf16_experts_args(x: nn.Module) -> tuple | None:
    """bf16 expert stacks in :func:`experts_span_args`' form (bits 16; the stacks' addresses in place of codes)."""
    if type(x) not in _BEXPERTS:  # an experts module of another kind (expert-parallel, LoRA, host-offloaded)
        return None
    gu, dn = x.gate_up_proj, x.down_proj
    if (gu.dim() != 3 or dn.dim() != 3 or not _bf16_ok(gu, dn)
            or gu.shape != (dn.shape[0], 2 * dn.shape[2], dn.shape[1])):
        return None
    return 16, 0, (gu.data_ptr(), 0, 0, 0), (dn.data_ptr(), 0, 0, 0), 16


def _in(m: nn.Module) -> int:
    return m.k if type(m) in _LINEAR else m.weight.shape[1]


def _out(m: nn.Module) -> int:
    return m.n if type(m) in _LINEAR else m.weight.shape[0]


def family(bits: int) -> str:
    """The ``choice`` family of a QSet's linears."""
    return "blinear" if bits == 16 else choice.qfamily(bits)


def set_families(qs: kernels.QSet) -> list[str]:
    """The ``choice`` families of a QSet's weights (a quantized set may mix bits)."""
    return [family(16)] if qs.bits == 16 else [family(int(b)) for b in qs.wbits[:qs.nw]]


def build_plan(layer: DecoderLayer) -> kernels.LayerPlan | None:
    """The native plan of a decoder layer, or None when some piece has no native form."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if (type(attn) not in _ATTENTION or type(mlp) not in (MoE, *_SWIGLU) or any(type(n) not in _NORM for n in norms)
            or (type(mlp) is MoE) != layer.is_moe):
        return None
    h = norms[0].weight.shape[0]
    if (any(n.weight.dtype != torch.bfloat16 or n.weight.shape != (h,) for n in norms) or h % 16
            or norms[1].eps != norms[0].eps):
        return None
    d, nq, nkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    if d % 16 or d > 128 or nq % nkv or nq // nkv > 8:
        return None

    def args(*mods: nn.Module) -> list:
        return [span_args(m) if type(m) in _LINEAR else bf16_args(m) for m in mods]

    qkv, o = kernels.qset(args(attn.q_proj, attn.k_proj, attn.v_proj)), kernels.qset(args(attn.o_proj))
    if (qkv is None or o is None or list(qkv.args[:3]) != [nq * d, nkv * d, nkv * d] or o.args[0] != h
            or _in(attn.q_proj) != h or _in(attn.o_proj) != nq * d):  # the C side sizes its buffers from these
        return None
    plan = kernels.LayerPlan(H=h, NQ=nq, NKV=nkv, D=d, eps=norms[0].eps, scale=d ** -0.5, qkv=qkv, o=o,
                             in_norm=norms[0].weight.data_ptr(), post_norm=norms[1].weight.data_ptr())
    swiglu = mlp.shared_experts if layer.is_moe else mlp
    if swiglu is not None and type(swiglu) not in _SWIGLU:
        return None
    if swiglu is not None:
        gu, dn = kernels.qset(args(swiglu.gate_proj, swiglu.up_proj)), kernels.qset(args(swiglu.down_proj))
        if (gu is None or dn is None or gu.args[0] != gu.args[1] or dn.args[0] != h or _in(swiglu.gate_proj) != h
                or _in(swiglu.down_proj) != gu.args[0]):
            return None
        plan.gate_up, plan.down, plan.W = gu, dn, _out(swiglu.gate_proj)
    if layer.is_moe:
        ex = mlp.experts
        experts = experts_span_args(ex) if type(ex) in _EXPERTS else bf16_experts_args(ex)
        gate = mlp.gate
        if experts is None or type(gate) not in _ROUTER:
            return None
        if experts[0] == 16:  # bf16 stacks [E, 2I, H]: their own count and width
            count, hidden = ex.gate_up_proj.shape[0], ex.gate_up_proj.shape[2]
        else:
            count, hidden = gate.weight.shape[0], ex.hidden
        if (gate.weight.dtype != torch.float32 or not gate.weight.is_contiguous() or gate.weight.shape[1] != h
                or hidden != h or count != gate.weight.shape[0]):
            return None
        plan.E, plan.K, plan.I, plan.norm_min = gate.weight.shape[0], gate.top_k, mlp.experts.width, gate.norm_min
        plan.router_w, plan.router_b = gate.weight.data_ptr(), gate.e_score_correction_bias.data_ptr()
        plan.ebits, plan.es_bf16 = experts[0], experts[1]
        plan.egu[:], plan.edn[:] = experts[2], experts[3]
        plan.edn_bits = experts[4]
    # the kernel families the layer calls, each once: ``choice`` must have them native at a step's row count
    plan.families = tuple(dict.fromkeys(
        ("small", *set_families(qkv), *set_families(o),
         *((*set_families(plan.gate_up), *set_families(plan.down)) if plan.W else ()),
         *(("bexperts" if plan.ebits == 16 else "qexperts",) if plan.E else ()))))
    return plan


_VERSION = attrgetter("version")
_FWD_HOOKS, _PRE_HOOKS = attrgetter("_forward_hooks"), attrgetter("_forward_pre_hooks")
_CHILDREN, _PARAMS, _BUFFERS = attrgetter("_modules"), attrgetter("_parameters"), attrgetter("_buffers")


class _Plan:
    """A layer's plan and the signature it was built from: every module's class, children, parameters and buffers
    (by identity), every full-precision tensor's address, every quantized weight's version (which its own changes
    bump: ``set_stored``, ``.to()``, ``load_state_dict``). The checks are C-level maps and list comparisons: a few
    microseconds a layer, every step."""

    __slots__ = ("dicts", "entries", "mods", "plan", "ptrs", "qweights", "tensors", "types", "versions")

    def __init__(self, layer: DecoderLayer) -> None:
        self.plan = build_plan(layer)
        self.mods = list(layer.modules())
        self.types = list(map(type, self.mods))
        plain = [m for m in self.mods if not isinstance(m, QWeight)]
        self.dicts = [d for d in (*map(_CHILDREN, self.mods), *map(_PARAMS, self.mods), *map(_BUFFERS, plain)) if d]
        self.entries = list(map(tuple, map(dict.values, self.dicts)))
        self.tensors = [t for m in plain for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        self.qweights = [m for m in self.mods if isinstance(m, QWeight)]
        self.versions = list(map(_VERSION, self.qweights))

    def valid(self) -> bool:
        return (list(map(type, self.mods)) == self.types
                and list(map(tuple, map(dict.values, self.dicts))) == self.entries
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs
                and list(map(_VERSION, self.qweights)) == self.versions)

    def hooked(self) -> bool:
        """A forward hook on any module of the layer: it must see the module calls, so the layer runs them."""
        return any(map(_FWD_HOOKS, self.mods)) or any(map(_PRE_HOOKS, self.mods))


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


class NativeDecoderLayer(DecoderLayer):
    """``DecoderLayer`` that runs a decode step of the CPU attention backend as one native call when it has a plan.
    The hidden states ``h [1, T, H]`` are then updated in place and returned (inference only: no autograd)."""

    reference = DecoderLayer
    accelerates = ("forward",)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: object, router_records: list | None) -> torch.Tensor:
        step = getattr(cache, "native_decode", None)
        if (step is not None and router_records is None and h.shape[0] == 1 and not torch.is_grad_enabled()
                and kernels.small_ok(h)):
            plan = self.native_plan()
            t = h.shape[1]
            if plan is not None and all(choice.native(f, t) for f in plan.families):
                kernels.decode_layer(plan, h[0], cos[0], sin[0], step, self.self_attn.layer_idx)  # h in place
                return h
        return DecoderLayer.forward(self, h, cos, sin, mask, cache, router_records)

    def native_plan(self) -> kernels.LayerPlan | None:
        """This layer's plan as it is now (rebuilt when its signature changed); None when it has no native form or
        a forward hook must see its modules run."""
        cached = self.__dict__.get("_accel_plan")
        if cached is None or not cached.valid():
            cached = self.__dict__["_accel_plan"] = _Plan(self)
        return None if cached.hooked() or _global_hooks() else cached.plan
