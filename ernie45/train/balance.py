"""Auxiliary-loss-free expert balancing (DeepSeek-V3 §2.1.2; ERNIE 4.5's ``moe_correction_bias_adjust``).

Each MoE router adds ``e_score_correction_bias`` to the probabilities when it *selects* experts (the
combine weights stay unbiased, spec §2.7). After every optimizer step the bias of an overloaded expert
goes down by ``rate`` and that of an underloaded one goes up by ``rate``, so load evens out without a
loss term pulling on the model's gradients.

Shape suffixes: L MoE layers, E experts, T tokens, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from ernie45.model.moe import MoE


def moe_modules(model: nn.Module) -> list[MoE]:
    """The model's MoE blocks in layer order (the order of ``ModelOutput.router``)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def expert_load(router: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int,
                token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Token→expert assignment counts per MoE layer, load_LE (fp32). Padding is left out by the mask."""
    rows = []
    for _, idx_TK in router:
        w = None
        if token_mask_T is not None:
            w = token_mask_T.reshape(-1).to(torch.float32).repeat_interleave(idx_TK.shape[1])
        rows.append(torch.bincount(idx_TK.reshape(-1), weights=w, minlength=num_experts).float())
    return torch.stack(rows)


def imbalance(load_LE: torch.Tensor) -> float:
    """Max load over mean load, averaged over layers: 1.0 is perfectly even, E/K is all-on-k-experts."""
    mean_L = load_LE.mean(-1).clamp(min=1e-9)
    return float((load_LE.max(-1).values / mean_L).mean())


@torch.no_grad()
def update_correction_bias(model: nn.Module, load_LE: torch.Tensor, rate: float) -> None:
    """bias_e += rate · sign(mean load - load_e) in every MoE layer (the DeepSeek-V3 update rule)."""
    mods = moe_modules(model)
    if len(mods) != load_LE.shape[0]:
        raise ValueError(f"expert load has {load_LE.shape[0]} layers but the model has {len(mods)} MoE blocks")
    for moe, load_E in zip(mods, load_LE):
        bias = moe.gate.e_score_correction_bias
        bias += rate * torch.sign(load_E.mean() - load_E).to(bias.device, bias.dtype)
