"""Native-backed versions of the model's modules (``ernie45.model``) for the CPU backend.

Each is a subclass of the reference module whose forward runs ``ernie45.kernels`` where the call fits the kernel
(decode sizes: a few rows, bf16 on CPU, inference) and the reference forward otherwise, with the same roundings:
the kernels reproduce the module code's bf16 casts, only sums run in another order. Which row counts go native is
the measured table of ``ernie45.accel.cpu.choice`` (per family and bucket of rows). Checks that cannot change
between calls (the kernel library, the layout) were made when the module was swapped (``ernie45.accel.cpu``); the
per-call checks are the input's (rows, dtype, device, autograd) and the weight's dtype (a later ``.float()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ernie45 import kernels
from ernie45.accel.cpu import choice
from ernie45.model.attention import Attention, AttentionCache
from ernie45.model.layers import Linear, RMSNorm, SwiGLU, apply_rope
from ernie45.model.moe import Experts, Router


def rows_of(x: torch.Tensor) -> int:
    """Rows of x's last dimension (tokens)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; ``kernels.bgemm`` where the table says it wins for x's rows (and the call fits it)."""
    rows = rows_of(x)
    if choice.native("blinear", rows):
        return kernels.linear(x, weight, bias, max_rows=rows)
    return F.linear(x, weight, bias)


class NativeRMSNorm(RMSNorm):
    """Decode sizes: one native call (``kernels.rms_norm``), the module's roundings."""

    reference = RMSNorm
    accelerates = ("forward",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = rows_of(x)
        if (self.weight.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0 and choice.native("small", rows)
                and kernels.small_ok(x, self.weight, max_rows=rows)):
            return kernels.rms_norm(x, self.weight, self.eps)
        return RMSNorm.forward(self, x)


class NativeLinear(Linear):
    """Few-row bf16 inference runs ``kernels.bgemm`` (the same products, fp32 accumulation, streamed at memory
    speed); training and other dtypes take ``F.linear``. ``local_linear`` is the same for sharded linears."""

    reference = Linear
    accelerates = ("forward", "local_linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return native_linear(x, self.weight, self.bias)

    def local_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return native_linear(x, weight, bias)


class NativeSwiGLU(SwiGLU):
    """Quantized decode: gate and up from one native call (``kernels.fused_linears``)."""

    reference = SwiGLU
    accelerates = ("forward",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = kernels.fused_linears((self.gate_proj, self.up_proj), x)
        if gu is None:
            return SwiGLU.forward(self, x)
        return self.down_proj(F.silu(gu[0]) * gu[1])


class NativeAttention(Attention):
    """Quantized decode: q/k/v from one native call; decode sizes: RoPE in place (``kernels.rope_``, the same bits
    as ``apply_rope``). The attention itself is the cache's (the engine's attention backend)."""

    reference = Attention
    accelerates = ("forward",)

    def forward(self, x_BTH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        b, t, _ = x_BTH.shape
        qkv = kernels.fused_linears((self.q_proj, self.k_proj, self.v_proj), x_BTH)
        q, k, v = qkv if qkv is not None else (self.q_proj(x_BTH), self.k_proj(x_BTH), self.v_proj(x_BTH))
        q = q.view(b, t, -1, self.head_dim)  # [B, T, N, D]
        k = k.view(b, t, -1, self.head_dim)  # [B, T, K, D]
        v = v.view(b, t, -1, self.head_dim)
        if b == 1 and cos.dtype == torch.float32 and choice.native("small", t) and kernels.small_ok(x_BTH, q, k,
                                                                                                  max_rows=t):
            kernels.rope_(q[0], cos[0], sin[0])
            kernels.rope_(k[0], cos[0], sin[0])
        else:
            q, k = apply_rope(q, cos[:, :, None], sin[:, :, None]), apply_rope(k, cos[:, :, None], sin[:, :, None])
        return self.o_proj(self.attend(q, k, v, mask, cache).reshape(b, t, -1))


class NativeRouter(Router):
    """Decode sizes: logits, softmax, biased top-k and renormalised weights in one native call."""

    reference = Router
    accelerates = ("forward",)

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = x_TH.shape[0]
        if (x_TH.shape[-1] % 16 == 0 and choice.native("small", rows)
                and kernels.small_ok(x_TH, self.weight, max_rows=rows)):
            return kernels.router(x_TH, self.weight, self.e_score_correction_bias, self.top_k, self.norm_min)
        return Router.forward(self, x_TH)


class NativeExperts(Experts):
    """bf16 experts. Decode sizes: every selected expert in one native call (``kernels.bmoe``: the per-expert path's
    roundings and ascending-expert fp32 sum); otherwise each expert's few-row slice through ``kernels.linear``."""

    reference = Experts
    accelerates = ("forward", "expert_forward")
    needs = {"forward": ("expert_forward",)}  # bmoe is the reference experts' math: not for a LoRA subclass

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        gu, dn = self.gate_up_proj, self.down_proj
        if (x_TH.device.type == "cpu" and choice.native("bexperts", x_TH.shape[0])
                and x_TH.dtype == gu.dtype == dn.dtype == torch.bfloat16 and gu.shape[-1] % 32 == 0
                and dn.shape[-1] % 32 == 0 and not kernels.needs_grad(x_TH, gu, dn) and kernels.available()):
            return kernels.bmoe(x_TH, idx_TK, w_TK, gu, dn)
        return Experts.forward(self, x_TH, idx_TK, w_TK)

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gate, up = native_linear(x_TH, self.gate_up_proj[e]).chunk(2, dim=-1)
        return native_linear(F.silu(gate) * up, self.down_proj[e])
