"""Quality of a quantized model against its full-precision original: perplexity on held-out tokens and the
mean KL divergence of the next-token distributions, KL(p_ref || p_quant), over every position.

Shape suffixes: B sequences, T tokens, V vocabulary.
"""

from __future__ import annotations

import math
import random

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


def split_documents(texts: list[str], tokenizer, calibration_tokens: int, eval_tokens: int,  # noqa: ANN001
                    seq_len: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and held-out evaluation ids from disjoint documents -> (calib [Bc, seq_len], eval [Be,
    seq_len]).

    Exact duplicate documents are dropped and the rest shuffled with ``seed``; calibration packs documents
    from the first half, evaluation from the second (each followed by EOS, the pretraining format), so no
    evaluated document is one the calibration saw. Token counts must be multiples of ``seq_len``.
    tokenizer: anything with ``encode(text)`` and ``eos_token_id`` (``ernie45.tokenizer.Tokenizer``).
    """
    for what, n in (("calibration_tokens", calibration_tokens), ("eval_tokens", eval_tokens)):
        if n <= 0 or n % seq_len:
            raise ValueError(f"{what}={n}: use a positive multiple of seq_len={seq_len}")
    docs = list(dict.fromkeys(texts))
    random.Random(seed).shuffle(docs)
    half = len(docs) // 2

    def pack(part: list[str], n: int, what: str) -> torch.Tensor:
        ids: list[int] = []
        for text in part:
            ids += tokenizer.encode(text) + [tokenizer.eos_token_id]
            if len(ids) >= n:
                return torch.tensor(ids[:n]).view(-1, seq_len)
        raise ValueError(f"{what}: {len(part)} documents hold only {len(ids)} tokens, fewer than the {n} asked "
                         f"for; give more text or ask for fewer tokens")

    return pack(docs[:half], calibration_tokens, "calibration"), pack(docs[half:], eval_tokens, "evaluation")
