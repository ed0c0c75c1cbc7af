"""Mixture-of-Experts block (spec §2.7): fp32 router, bias-for-selection-only, stacked experts.

Shape suffixes: T tokens, H hidden, E experts, K top-k, I expert width, S token-expert pairs (T*K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ernie45.config import ModelConfig
from ernie45.model.layers import SwiGLU


class Router(nn.Module):
    """Top-k gate. The weight and the aux-free correction bias stay fp32 whatever the model dtype."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.moe_k
        self.norm_min = config.moe_norm_min
        self.weight = nn.Parameter(torch.zeros(config.moe_num_experts, config.hidden_size, dtype=torch.float32))
        # Checkpoint name: mlp.moe_statics.e_score_correction_bias [1, E]; squeezed on load.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.moe_num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        # model.to(torch.bfloat16) must not touch the router: it is fp32 in the checkpoint and in the
        # reference (transformers' _keep_in_fp32_modules_strict).
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:
            self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (probs_TE fp32, weights_TK in x.dtype, idx_TK)."""
        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)  # over all E experts, fp32
            # The bias only picks the experts; the combine weights stay unbiased (spec §2.7, PR39581).
            _, idx_TK = torch.topk(probs_TE + self.e_score_correction_bias, self.top_k, dim=-1)
            w_TK = probs_TE.gather(-1, idx_TK)
            w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return probs_TE, w_TK.to(x_TH.dtype), idx_TK


class Experts(nn.Module):
    """E routed SwiGLU experts stacked as ``gate_up_proj [E, 2I, H]`` (gate rows first) and
    ``down_proj [E, H, I]``: one slice per expert for grouped kernels and expert sharding.

    Subclasses (quantized, LoRA, expert-parallel) override :meth:`expert_forward` or :meth:`forward`.
    """

    def __init__(self, num_experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.width = width
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, width))

    def expert_forward(self, e: int, x_TH: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x_TH, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(self, x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """Sort token-expert pairs by expert, run each selected expert once on its contiguous slice,
        scatter back weighted. Never loops over tokens; unselected experts' weights are not read."""
        k = idx_TK.shape[1]
        flat_S = idx_TK.reshape(-1)
        order_S = flat_S.argsort(stable=True)
        token_S = order_S // k
        counts = torch.bincount(flat_S, minlength=self.num_experts).tolist()
        x_SH = x_TH[token_S]
        out_SH = torch.empty_like(x_SH)
        start = 0
        for e, n in enumerate(counts):
            if n:
                out_SH[start:start + n] = self.expert_forward(e, x_SH[start:start + n])
                start += n
        out_SH = out_SH * w_TK.reshape(-1)[order_S, None]
        # Ascending expert order per token, as the reference's per-expert index_add_. Accumulated in fp32
        # explicitly: on CPU a bf16 index_add_ with repeated indices takes a slow path (~10-70 ms per
        # call at batch 1) while accumulating in fp32 internally anyway, so this gives the same bits.
        acc_TH = torch.zeros(x_TH.shape, dtype=torch.float32, device=x_TH.device)
        return acc_TH.index_add_(0, token_S, out_SH.float()).to(x_TH.dtype)


class RouterRecords:
    """The routers' (probs_TE, idx_TK) of one forward, appended by each MoE layer in layer order (``records``).

    Not a list on purpose: a wrapper that rebuilds its module's list/tuple/dict arguments hands the layer a
    copy, and what the layer appends to the copy is lost. FSDP2 does that: its pre-forward swaps each
    grad-requiring tensor inside the arguments for a hooked one and rebuilds every container that held one
    (from the second MoE layer on, the list holds the first layer's probs), so the expert loads of an
    ``apply_fsdp`` model vanished. An object of its own type is passed through as it is."""

    def __init__(self) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def append(self, record: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.records.append(record)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.moe_num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.shared_intermediate_size, bias=config.use_bias)
            if config.moe_num_shared_experts else None
        )

    def forward(self, x_BTH: torch.Tensor, router_records: RouterRecords | None = None) -> torch.Tensor:
        shape = x_BTH.shape
        x_TH = x_BTH.reshape(-1, shape[-1])
        probs_TE, w_TK, idx_TK = self.gate(x_TH)
        if router_records is not None:
            router_records.append((probs_TE, idx_TK))
        y_TH = self.experts(x_TH, idx_TK, w_TK)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)  # added after the routed sum (spec §2.7)
        return y_TH.view(shape)
