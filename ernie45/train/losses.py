"""Training losses as pure functions of tensors (no modules, no state).

Shape suffixes: B batch, T tokens, V vocab, E experts, K top-k. Labels are already shifted
(``labels[b, t]`` is the target of position t) and IGNORE (-100) marks positions without loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ernie45.train.data import IGNORE


def masked_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                         reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Cross-entropy over positions whose label is not IGNORE, computed in fp32.

    ``sum`` lets gradient accumulation divide by the token count of the whole optimizer step, so a
    step's gradient does not depend on how its tokens were split into micro-batches.
    """
    loss = F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    if reduction == "sum":
        return loss
    return loss / (labels_BT != IGNORE).sum().clamp(min=1)


def sequence_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over each row of log p(label) at labelled positions, and the number of those positions.

    Returns (logps_B fp32, counts_B).
    """
    mask_BT = labels_BT != IGNORE
    logp_BTV = logits_BTV.float().log_softmax(-1)
    tok_BT = logp_BTV.gather(-1, labels_BT.clamp(min=0)[..., None])[..., 0]
    return (tok_BT * mask_BT).sum(-1), mask_BT.sum(-1)


def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float = 0.1, loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

    Inputs are per-sequence log-probabilities of the replies (sums for DPO; IPO is usually given
    per-token means, as TRL does). With h = (pc - rc) - (pr - rr):
      sigmoid: -(1-ε) log σ(β h) - ε log σ(-β h)     (ε = label_smoothing, cDPO)
      ipo:     (h - 1/(2β))²
    Returns (mean loss, chosen rewards β(pc - rc), rejected rewards β(pr - rr)); the rewards are
    detached and their difference is the implicit reward margin.
    """
    h_B = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h_B) - label_smoothing * F.logsigmoid(-beta * h_B)
    elif loss_type == "ipo":
        losses = (h_B - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose 'sigmoid' or 'ipo' (or use simpo_loss)")
    chosen = beta * (policy_chosen_B - ref_chosen_B).detach()
    rejected = beta * (policy_rejected_B - ref_rejected_B).detach()
    return losses.mean(), chosen, rejected


def simpo_loss(policy_chosen_avg_B: torch.Tensor, policy_rejected_avg_B: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): reference-free, length-normalised rewards β·mean log p, margin γ.

    loss = -log σ(β (c̄ - r̄) - γ). Inputs are per-token mean log-probabilities of each reply.
    """
    chosen, rejected = beta * policy_chosen_avg_B, beta * policy_rejected_avg_B
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), chosen.detach(), rejected.detach()


def load_balancing_loss(router: list[tuple[torch.Tensor, torch.Tensor]], num_experts: int,
                        token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard auxiliary loss averaged over MoE layers: E · Σ_e f_e · P_e, where f_e is the
    fraction of token→expert assignments that went to e and P_e the mean router probability of e.

    ``router`` is ``ModelOutput.router``: per MoE layer (probs_TE fp32, idx_TK). ``token_mask_T``
    (1 = real token) leaves padding out. Equals 1 for perfectly uniform routing; grows with imbalance.
    Gradients flow through P_e only (f_e is a count).
    """
    if not router:
        raise ValueError("load_balancing_loss needs router records: call model(..., return_router=True) "
                         "on a MoE model")
    total = torch.zeros((), dtype=torch.float32, device=router[0][0].device)
    for probs_TE, idx_TK in router:
        w_T = (torch.ones(probs_TE.shape[0], device=probs_TE.device) if token_mask_T is None
               else token_mask_T.reshape(-1).to(probs_TE.dtype))
        n = w_T.sum().clamp(min=1)
        counts_E = torch.zeros(num_experts, device=probs_TE.device).index_add_(
            0, idx_TK.reshape(-1), w_T.repeat_interleave(idx_TK.shape[1]))
        f_E = counts_E / (n * idx_TK.shape[1])
        p_E = (probs_TE * w_T[:, None]).sum(0) / n
        total = total + num_experts * (f_E * p_E).sum()
    return total / len(router)


# ----------------------------------------------------------------------------------------- UPO (online)
# Shape suffixes here: P prompts, G samples per prompt, N = P*G completions, T completion tokens.

def token_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position, fp32 [B, T] (0 where the label is IGNORE)."""
    logp_BTV = logits_BTV.float().log_softmax(-1)
    tok_BT = logp_BTV.gather(-1, labels_BT.clamp(min=0)[..., None])[..., 0]
    return tok_BT * (labels_BT != IGNORE)


def group_advantages(rewards_PG: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath §4.1.2): each completion's reward
    minus its group's mean, divided by the group's standard deviation (Bessel-corrected, as TRL) + eps
    when ``scale`` (Dr. GRPO, Liu et al. 2025, drops the division: ``scale=False``). A group whose G
    rewards are equal gets advantage 0 everywhere. Returns A_PG (fp32, or the input's float dtype)."""
    r = rewards_PG if rewards_PG.is_floating_point() else rewards_PG.float()
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv


def clipped_policy_loss(logp_NT: torch.Tensor, old_logp_NT: torch.Tensor, adv_N: torch.Tensor,
                        mask_NT: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017), negated to a loss:
    -min(ρ A, clip(ρ, 1-ε, 1+ε) A) with ρ = exp(logp - old_logp). Returns (sum over masked tokens,
    number of masked tokens where the clipped branch was the smaller, i.e. the gradient is cut)."""
    ratio = torch.exp(logp_NT - old_logp_NT)
    a = adv_N[:, None]
    plain, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    per_tok = -torch.minimum(plain, clipped)
    m = mask_NT.to(per_tok.dtype)
    return (per_tok * m).sum(), ((clipped < plain) & mask_NT.bool()).sum()


def k3_kl(logp_NT: torch.Tensor, ref_logp_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π || π_ref) per sampled token, as in GRPO:
    exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased under samples from π). Sum over masked tokens."""
    d = ref_logp_NT - logp_NT
    return ((torch.exp(d) - d - 1) * mask_NT.to(d.dtype)).sum()
