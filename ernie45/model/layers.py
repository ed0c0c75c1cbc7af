"""Building blocks: RMSNorm, interleaved RoPE, SwiGLU MLP (spec §2.3, §2.5, §2.6).

Shape suffixes: T tokens, H hidden, D head_dim, N heads, I intermediate width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)); the variance is taken in fp32 and the result cast back to the input
    dtype *before* the weight multiply (the transformers order, spec §2.3)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Angles for interleaved RoPE, computed in fp32 from positions (no table: any length works)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)  # [D/2]
        if not self.inv_freq.is_meta:  # on meta there is no value, and arange there imports torch._dynamo
            self.reset()

    def reset(self) -> None:
        """(Re)compute inv_freq in fp32; needed after a meta-device build (to_empty leaves garbage)."""
        d = self.head_dim
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                             device=self.inv_freq.device) / d))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: integer tensor of any shape S -> (cos, sin), each S + [D/2], fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the last dim by the angles (GPT-J layout, spec §2.5).

    x: [..., D] in any dtype; cos/sin: broadcastable to [..., D/2], fp32. The rotation runs in fp32 and
    the result is cast back to x.dtype, as the reference does. Not the NeoX half-split layout.
    """
    x32 = x.float()
    x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
    out = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` under a name of its own: the model's projections, which passes applied from outside find by
    exact type (``quant`` swaps them for quantized ones, ``accel`` for native-backed ones). Checkpoint names and
    parameters are nn.Linear's."""


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP and the shared experts (spec §2.6)."""

    def __init__(self, hidden: int, width: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, width, bias=bias)
        self.up_proj = Linear(hidden, width, bias=bias)
        self.down_proj = Linear(width, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
