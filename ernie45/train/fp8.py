"""FP8 mixed-precision training: the matmuls of attention, dense MLPs, shared and routed experts in FP8
with dynamic scaling; master weights, gradients and the optimizer stay fp32.

Two paths, one recipe (e4m3 for weights and activations, e5m2 for gradients, scales from the current
amax: ``scale = amax / fp8_max``, so the largest value lands on the format's maximum):

- ``nn.Linear`` layers: torchao's float8 training (``convert_to_float8_training``, tensorwise dynamic
  scaling), the maintained implementation torchtitan uses.
- Routed experts: our stacked ``Experts`` keep ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` as
  raw parameters sliced per expert, not ``nn.Linear`` modules, and torchao's MoE path
  (``torchao.prototype.moe_training``) is a prototype needing Triton kernels, SM90+ and a grouped-GEMM
  layout (token groups padded to 16, ``offs``). So experts call ``torch._scaled_mm`` directly with
  **rowwise** dynamic scaling (one scale per token row and per weight row, as DeepSeek-V3 and torchao's
  rowwise recipe), in a small autograd function whose backward runs the two gradient GEMMs in FP8 too.

Hardware: ``torch._scaled_mm`` needs CUDA compute capability >= 8.9 (Ada, Hopper). Elsewhere
``enable_fp8`` raises ``Fp8Unavailable`` naming the requirement. ``emulate=True`` replaces each FP8 GEMM
by its exact emulation (cast round trip to the FP8 type with the same scales, fp32 matmul): how the
numerics are tested on CPU.

Shape suffixes: T tokens, K contraction, N outputs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.model.moe import Experts

log = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MIN_CAPABILITY = (8, 9)
_ALIGN = 16  # _scaled_mm: every matrix dimension a multiple of 16
GRAD_DTYPE = torch.bfloat16  # the gradient GEMMs' output (rowwise _scaled_mm writes bf16 on Hopper)


class Fp8Unavailable(RuntimeError):
    """FP8 training requested where the hardware has no FP8 matmul."""


def fp8_supported(device: torch.device | str | None = None) -> bool:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device.type == "cuda" and torch.cuda.is_available() and \
        torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def require_fp8(device: torch.device | str | None = None) -> None:
    """Raise Fp8Unavailable unless ``device`` can run FP8 matmuls."""
    if fp8_supported(device):
        return
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_available():
        have = f"CUDA capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    else:
        have = "no CUDA device" if not torch.cuda.is_available() else f"device {device.type!r}"
    raise Fp8Unavailable(f"precision: fp8 needs a GPU with FP8 tensor cores (CUDA compute capability >= "
                         f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: H100/H200/H20, L40S, RTX 4090); this run has "
                         f"{have}. Use precision: bf16 here.")


# ------------------------------------------------------------------------------------------ math
def quantize_rowwise(x_TK: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [T, K] in ``dtype``, scale [T, 1] fp32) with x ~= q * scale; each row's amax maps to the
    format's max. Values are clamped before the cast (e4m3fn has no infinity)."""
    fmax = torch.finfo(dtype).max
    amax = x_TK.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / fmax
    q = (x_TK.float() / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale


def scaled_mm(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
              out_dtype: torch.dtype, emulate: bool) -> torch.Tensor:
    """(a_q * a_s) @ (b_q * b_s)^T: a_q [M, K], b_q [N, K] (rows = outputs), scales [M, 1] / [N, 1]."""
    if emulate:
        return ((a_q.float() * a_s) @ (b_q.float() * b_s).t()).to(out_dtype)
    m, k = a_q.shape
    pad_m, pad_k = -m % _ALIGN, -k % _ALIGN
    if pad_k:  # zero columns add nothing to the products
        a_q, b_q = F.pad(a_q.view(torch.uint8), (0, pad_k)).view(a_q.dtype), \
            F.pad(b_q.view(torch.uint8), (0, pad_k)).view(b_q.dtype)
    if pad_m:
        a_q = F.pad(a_q.view(torch.uint8), (0, 0, 0, pad_m)).view(a_q.dtype)
        a_s = F.pad(a_s, (0, 0, 0, pad_m), value=1.0)
    out = torch._scaled_mm(a_q.contiguous(), b_q.contiguous().t(), scale_a=a_s.contiguous(),
                           scale_b=b_s.t().contiguous(), out_dtype=out_dtype)
    return out[:m]


class Fp8Matmul(torch.autograd.Function):
    """y [T, N] = x [T, K] @ w [N, K]^T with every GEMM in FP8, rowwise dynamic scales:

    - forward  y  = x(e4m3, per token) . w(e4m3, per output row)
    - backward dx = dy(e5m2, per token) . w^T(e4m3, per input column)
               dw = dy^T(e5m2, per output row) . x^T(e4m3, per input column)
    Each scale runs along the contraction's other axis, so it factors out of the sum exactly."""

    @staticmethod
    def forward(ctx, x_TK: torch.Tensor, w_NK: torch.Tensor, out_dtype: torch.dtype, emulate: bool):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x_TK, w_NK)
        ctx.emulate = emulate
        xq, xs = quantize_rowwise(x_TK, E4M3)
        wq, ws = quantize_rowwise(w_NK, E4M3)
        return scaled_mm(xq, xs, wq, ws, out_dtype, emulate)

    @staticmethod
    def backward(ctx, g_TN: torch.Tensor):  # noqa: ANN001, ANN205
        x_TK, w_NK = ctx.saved_tensors
        gq, gs = quantize_rowwise(g_TN, E5M2)
        wtq, wts = quantize_rowwise(w_NK.t(), E4M3)
        dx = scaled_mm(gq, gs, wtq, wts, GRAD_DTYPE, ctx.emulate).to(x_TK.dtype)
        gtq, gts = quantize_rowwise(g_TN.t(), E5M2)
        xtq, xts = quantize_rowwise(x_TK.t(), E4M3)
        dw = scaled_mm(gtq, gts, xtq, xts, GRAD_DTYPE, ctx.emulate).to(w_NK.dtype)
        return dx, dw, None, None


def fp8_linear(x: torch.Tensor, w_NK: torch.Tensor, emulate: bool = False) -> torch.Tensor:
    """``F.linear(x, w)`` through ``Fp8Matmul`` (x of any leading shape); output in the autocast dtype
    when autocast is on, else x's dtype."""
    shape = x.shape
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    y = Fp8Matmul.apply(x.reshape(-1, shape[-1]), w_NK, out_dtype, emulate)
    return y.reshape(*shape[:-1], w_NK.shape[0])


class Fp8Experts(Experts):
    """Routed experts whose two GEMMs per expert run in FP8 (``fp8_linear``); same parameters."""

    fp8_emulate: bool = False

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_TH.device.type, enabled=False):  # our own casts: fp32 masters in, FP8 GEMMs
            gate, up = fp8_linear(x_TH, self.gate_up_proj[e], self.fp8_emulate).chunk(2, dim=-1)
            return fp8_linear(F.silu(gate) * up, self.down_proj[e], self.fp8_emulate).to(x_TH.dtype)


# ------------------------------------------------------------------------------------------ the pass
def _linear_filter(module: nn.Module, fqn: str) -> bool:
    """torchao swaps these: every Linear but the LM head, with dims FP8 GEMMs accept (multiples of 16)."""
    if not isinstance(module, nn.Linear) or fqn.endswith("lm_head") or fqn.split(".")[-1] == "lm_head":
        return False
    return module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0


def enable_fp8(model: nn.Module, emulate: bool = False, experts: bool = True) -> dict[str, int]:
    """Apply FP8 training to ``model`` in place (after parallelize, before FSDP / recompute wrapping).

    emulate: run each FP8 GEMM as its cast-round-trip emulation (any device; for tests). Without it the
    hardware must have FP8 (``require_fp8``). Returns how many linears and expert blocks were converted.
    The router (fp32, spec §2.7), norms, embeddings and the LM head stay in higher precision."""
    if hasattr(model, "submodules"):  # a Pipeline (ernie45.parallel.pipeline): each of its stages
        counts = [enable_fp8(m, emulate, experts) for m in model.modules]
        return {k: sum(c[k] for c in counts) for k in ("linears", "expert_blocks")}
    if not emulate:
        require_fp8(next(model.parameters()).device)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:  # the fp8 extra
        raise Fp8Unavailable(f"precision: fp8 needs torchao (pip install 'ernie45[fp8]'): {e}") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_to_float8_training(model, module_filter_fn=_linear_filter, config=Float8LinearConfig(emulate=emulate))
    linears = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    blocks = 0
    if experts:
        for m in model.modules():
            if type(m) is Experts:
                m.__class__ = Fp8Experts
                m.fp8_emulate = emulate
                blocks += 1
            elif isinstance(m, Experts) and not isinstance(m, Fp8Experts) and hasattr(m, "ep"):
                m.__class__ = _fp8_parallel_class(type(m))
                m.fp8_emulate = emulate
                blocks += 1
    log.info("fp8: %d linears (torchao, tensorwise), %d expert blocks (rowwise _scaled_mm)%s", linears, blocks,
             " emulated" if emulate else "")
    return {"linears": linears, "expert_blocks": blocks}


_PARALLEL: dict[type, type] = {}


def _fp8_parallel_class(cls: type) -> type:
    """ParallelExperts (ernie45.parallel) with the FP8 expert_forward."""
    if cls not in _PARALLEL:
        _PARALLEL[cls] = type(f"Fp8{cls.__name__}", (cls,), {"expert_forward": Fp8Experts.expert_forward,
                                                              "fp8_emulate": False})
    return _PARALLEL[cls]
