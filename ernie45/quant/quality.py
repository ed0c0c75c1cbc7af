"""Quality of a quantized model against its full-precision original: perplexity on held-out tokens and the
mean KL divergence of the next-token distributions, KL(p_ref || p_quant), over every position.

Shape suffixes: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def compare(reference: nn.Module, quantized: nn.Module, ids_BT: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Returns {"ppl_ref", "ppl", "kl"} over next-token predictions of ``ids_BT`` (token t predicts t+1).

    Both models run their plain forward in their own dtype; log-probabilities are compared in fp32.
    """
    nll_ref = nll_q = kl = 0.0
    n = 0
    for i in range(0, ids_BT.shape[0], batch):
        ids = ids_BT[i:i + batch]
        target_BT = ids[:, 1:]
        lp_ref = F.log_softmax(reference(ids).logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
        lp_q = F.log_softmax(quantized(ids).logits[:, :-1].float(), dim=-1)
        nll_ref += float(-lp_ref.gather(-1, target_BT[..., None]).sum())
        nll_q += float(-lp_q.gather(-1, target_BT[..., None]).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp_q)).sum())
        n += target_BT.numel()
    return {"ppl_ref": math.exp(nll_ref / n), "ppl": math.exp(nll_q / n), "kl": kl / n}
