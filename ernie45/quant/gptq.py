"""GPTQ (Frantar et al. 2022): calibrated quantization with error feedback.

Columns are quantized one at a time; each column's rounding error is spread over the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs (H = X^T X over calibration tokens), so
the layer's *output* error is minimised rather than the weight error. Group scales/offsets are taken from
the error-updated weights when a group starts (the "static groups off" variant). Needs activations: the
hessians come from running the full-precision model on calibration tokens (``collect_hessians``).

Shape suffixes: N out rows, K in columns, T tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.model.moe import Experts
from ernie45.quant.math import check_bits


@torch.no_grad()
def collect_hessians(model: nn.Module, ids_BT: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """X^T X [K, K] (fp32) of the input of every Linear (by module name) and of every expert's two
    projections (``<experts>.gate_up_proj.<e>``, ``<experts>.down_proj.<e>``), from a forward over ids."""
    hess: dict[str, torch.Tensor] = {}

    def acc(key: str, x_TK: torch.Tensor) -> None:
        x = x_TK.reshape(-1, x_TK.shape[-1]).float()
        hess[key] = hess.get(key, 0) + x.t() @ x

    hooks = []
    patched = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: acc(name, args[0])))
        elif type(m) is Experts:
            def expert_forward(e: int, x_TH: torch.Tensor, m=m, name=name) -> torch.Tensor:  # noqa: ANN001
                acc(f"{name}.gate_up_proj.{e}", x_TH)
                gate, up = F.linear(x_TH, m.gate_up_proj[e]).chunk(2, dim=-1)
                h = F.silu(gate) * up
                acc(f"{name}.down_proj.{e}", h)
                return F.linear(h, m.down_proj[e])

            m.expert_forward = expert_forward  # instance attribute shadows the method for this pass only
            patched.append(m)
    try:
        for i in range(0, ids_BT.shape[0], batch):
            model(ids_BT[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
        for m in patched:
            del m.expert_forward
    return hess


@torch.no_grad()
def quantize_gptq(w_NK: torch.Tensor, hess_KK: torch.Tensor | None, bits: int, group_size: int,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one weight -> (codes [N, K] uint8, scales [N, G], offsets [N, G]) as ``math.quantize_rtn``.
    Without a hessian (an expert no calibration token reached) it is plain RTN."""
    check_bits(bits)
    w = w_NK.float().clone()
    n, k = w.shape
    qmax = 2**bits - 1
    if hess_KK is None:
        hess_KK = torch.eye(k)
    h = hess_KK.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [K, K]
    g = k // group_size
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales, offsets = torch.empty(n, g), torch.empty(n, g)
    for i in range(k):
        if i % group_size == 0:
            grp = w[:, i:i + group_size]
            lo, hi = grp.amin(1), grp.amax(1)
            s = ((hi - lo) / qmax).clamp(min=1e-12)
            scales[:, i // group_size], offsets[:, i // group_size] = s, lo
        s, o = scales[:, i // group_size], offsets[:, i // group_size]
        q = ((w[:, i] - o) / s).round().clamp(0, qmax)
        codes[:, i] = q.to(torch.uint8)
        err = (w[:, i] - (q * s + o)) / hinv[i, i]  # [N]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
    return codes, scales, offsets
