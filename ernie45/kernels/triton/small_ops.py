"""Small fused ops of a decoder layer in Triton, where one kernel replaces several launches:

- :func:`add_rms_norm`: ``h += x`` (the residual add, in the activation dtype) then RMSNorm of the new ``h`` —
  the variance in fp32, the normalised value cast to the activation dtype before the weight multiply (the
  reference's order, ``ernie45.model.layers.RMSNorm``);
- :func:`rope_kv_write`: interleaved RoPE (pairs ``2i, 2i+1``, fp32 rotation) of q in place and of k, with the
  rotated k and the v of each token written straight into its cache slot.

Shape suffixes: T tokens, H hidden, N query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, out_ptr, hidden, eps, stride_x, stride_h, stride_o,
                         HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < hidden
    h = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0)
    if HAS_X:
        h = h + tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
        tl.store(h_ptr + row * stride_h + offs, h, mask=ok)
    h32 = h.to(tl.float32)
    var = tl.sum(h32 * h32, 0) / hidden
    y = (h32 * tl.rsqrt(var + eps)).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)


def add_rms_norm(h_TH: torch.Tensor, weight: torch.Tensor, eps: float, x_TH: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """``h += x`` in place (when x is given), then ``RMSNorm(h)``; returns the normalised rows [T, H]."""
    if h_TH.dim() != 2 or h_TH.stride(-1) != 1 or weight.shape != (h_TH.shape[1],):
        raise ValueError(f"add_rms_norm: h must be [T, H] with unit column stride and weight [H]; got "
                         f"{tuple(h_TH.shape)} and {tuple(weight.shape)}")
    t, hidden = h_TH.shape
    out = torch.empty(h_TH.shape, dtype=torch.promote_types(weight.dtype, h_TH.dtype), device=h_TH.device)
    xs = x_TH.contiguous() if x_TH is not None else h_TH
    _add_rms_norm_kernel[(t,)](xs, h_TH, weight, out, hidden, eps, xs.stride(0), h_TH.stride(0), out.stride(0),
                               HAS_X=x_TH is not None, BLOCK=triton.next_power_of_2(hidden))
    return out


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, kc_ptr, vc_ptr,
                    num_q, num_kv, stride_qt, stride_qn, stride_kt, stride_kn, stride_vt, stride_vn,
                    stride_cs, stride_slot, stride_ch,
                    HALF: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + t * stride_cs + i)
    s = tl.load(sin_ptr + t * stride_cs + i)
    hq = tl.arange(0, NQ)
    qm = (hq < num_q)[:, None]
    qe_p = q_ptr + t * stride_qt + hq[:, None] * stride_qn + 2 * i[None, :]
    qe = tl.load(qe_p, mask=qm, other=0.0)
    qo = tl.load(qe_p + 1, mask=qm, other=0.0)
    qe32, qo32 = qe.to(tl.float32), qo.to(tl.float32)
    tl.store(qe_p, (qe32 * c[None, :] - qo32 * s[None, :]).to(qe.dtype), mask=qm)
    tl.store(qe_p + 1, (qo32 * c[None, :] + qe32 * s[None, :]).to(qe.dtype), mask=qm)
    hk = tl.arange(0, NK)
    km = (hk < num_kv)[:, None]
    ke_p = k_ptr + t * stride_kt + hk[:, None] * stride_kn + 2 * i[None, :]
    ke = tl.load(ke_p, mask=km, other=0.0).to(tl.float32)
    ko = tl.load(ke_p + 1, mask=km, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    dst = kc_ptr + slot * stride_slot + hk[:, None] * stride_ch + 2 * i[None, :]
    dt = kc_ptr.dtype.element_ty
    tl.store(dst, (ke * c[None, :] - ko * s[None, :]).to(dt), mask=km)
    tl.store(dst + 1, (ko * c[None, :] + ke * s[None, :]).to(dt), mask=km)
    ve_p = v_ptr + t * stride_vt + hk[:, None] * stride_vn + 2 * i[None, :]
    vdst = vc_ptr + slot * stride_slot + hk[:, None] * stride_ch + 2 * i[None, :]
    tl.store(vdst, tl.load(ve_p, mask=km, other=0.0).to(dt), mask=km)
    tl.store(vdst + 1, tl.load(ve_p + 1, mask=km, other=0.0).to(dt), mask=km)


def rope_kv_write(q_TND: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, cos_TD2: torch.Tensor,
                  sin_TD2: torch.Tensor, slots_T: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
                  ) -> None:
    """Rotate q in place; write rotate(k) and v into the cache slots (``block * block_size + offset``)."""
    t, n, d = q_TND.shape
    kv = k_TKD.shape[1]
    half = d // 2
    if d % 2 or half & (half - 1) or cos_TD2.shape != (t, half) or cos_TD2.dtype != torch.float32:
        raise ValueError(f"rope_kv_write: head_dim {d} must be even with a power-of-two half and cos/sin fp32 "
                         f"[T, {half}]; got {tuple(cos_TD2.shape)} {cos_TD2.dtype}")
    for name, x in (("q", q_TND), ("k", k_TKD), ("v", v_TKD)):
        if x.stride(-1) != 1:
            raise ValueError(f"rope_kv_write: {name} needs unit stride along head_dim")
    kc = k_cache.flatten(0, 1)
    cos, sin = cos_TD2.contiguous(), sin_TD2.contiguous()
    _rope_kv_kernel[(t,)](q_TND, k_TKD, v_TKD, cos, sin, slots_T, kc, v_cache.flatten(0, 1), n, kv,
                          q_TND.stride(0), q_TND.stride(1), k_TKD.stride(0), k_TKD.stride(1),
                          v_TKD.stride(0), v_TKD.stride(1), cos.stride(0), kc.stride(0), kc.stride(1),
                          HALF=half, NQ=triton.next_power_of_2(n), NK=triton.next_power_of_2(kv))
