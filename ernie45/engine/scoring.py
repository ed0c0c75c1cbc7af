"""Prompt log-probabilities: how likely the model finds each prompt token given the ones before it.

This is what evaluation harnesses ask a server for (`echo` + `logprobs` on /v1/completions, vLLM's
`prompt_logprobs`): lm-eval scores a multiple-choice answer as the sum of its tokens' log-probabilities.
It is one plain forward of the whole prompt (no KV cache, no sampling), the LM head applied in slices of
positions so a long prompt never holds [T, 103k] fp32 logits at once. Logprobs are the raw model
distribution (fp32 log_softmax of the logits), as for generated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEAD_ROWS = 256  # positions per LM-head slice: 256 x 103424 x 4 B = 106 MB of fp32 logits at most


@dataclass
class PromptLogprob:
    """Position i >= 1 of the prompt: its token's logprob, its rank (1 = most likely), the top-k."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@torch.inference_mode()
def prompt_logprobs(model: torch.nn.Module, token_ids: list[int], k: int = 0) -> list[PromptLogprob | None]:
    """One entry per prompt token; the first is None (nothing precedes it). `k` top alternatives each."""
    if getattr(model, "parallel_mesh", None) is not None:
        raise ValueError("prompt logprobs are not available on a multi-rank (tensor/expert parallel) engine")
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], dtype=torch.long, device=device)  # [1, T]
    hidden_TH = model(ids, compute_logits=False).hidden_states[0]
    out: list[PromptLogprob | None] = [None]
    for s in range(0, len(token_ids) - 1, HEAD_ROWS):
        e = min(s + HEAD_ROWS, len(token_ids) - 1)
        logp_RV = model.lm_head(hidden_TH[s:e]).float().log_softmax(-1)  # rows predict tokens s+1..e
        target_R = ids[0, s + 1:e + 1]
        chosen_R = logp_RV.gather(1, target_R[:, None])[:, 0]
        rank_R = (logp_RV > chosen_R[:, None]).sum(-1) + 1
        top_v, top_i = logp_RV.topk(k, dim=-1) if k else (None, None)
        chosen, ranks = chosen_R.tolist(), rank_R.tolist()
        tv = top_v.tolist() if k else [[]] * (e - s)
        ti = top_i.tolist() if k else [[]] * (e - s)
        for r in range(e - s):
            out.append(PromptLogprob(int(target_R[r]), chosen[r], ranks[r], list(zip(ti[r], tv[r]))))
    return out
