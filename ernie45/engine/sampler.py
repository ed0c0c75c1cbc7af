"""Logits processors and sampling, vectorised over the batch.

Order (as vLLM): penalties (repetition on prompt+output, presence/frequency on output) -> min_tokens
(stop ids masked) -> greedy rows take the argmax; the others: temperature -> top_k -> top_p -> min_p
-> one draw. The draw is the exponential race ``argmax(p / q), q ~ Exp(1)``, equivalent to sampling
from p; q comes from the request's own generator when it has a seed, so a seeded request gives the
same tokens whatever else shares the batch.

Logprobs are the *raw* model distribution (log_softmax of the unprocessed logits), vLLM's default;
they do not reflect temperature, penalties or truncation.

Shape suffixes: S sequences sampling this step, V vocabulary, L padded token-list length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ernie45.engine.sequence import Sequence
from ernie45.engine.structured import apply_processors


@dataclass
class SeqSampling:
    """Per-sequence sampling state the engine keeps in ``seq.state.sampling``."""

    generator: torch.Generator | None = None
    stop_ids: list[int] = field(default_factory=list)
    """Token ids masked until min_tokens is reached (EOS unless ignore_eos, plus stop_token_ids)."""
    processors: list = field(default_factory=list)
    """logit_bias, allowed ids, thinking budget, grammar mask (ernie45.engine.structured), in this order."""


def make_generator(seed: int | None, index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Per-sequence generator; completion ``index`` of an n>1 request gets its own stream."""
    if seed is None:
        return None
    mixed = (seed * 0x9E3779B97F4A7C15 + index) % (2**63) if index else seed % (2**63)
    return torch.Generator(device=device).manual_seed(mixed)


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([x + [pad] * (width - len(x)) for x in lists], dtype=torch.long, device=device)  # [S, L]


def apply_penalties(logits_SV: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (HF: tokens of prompt or output, logit / p if positive else x p), presence and
    frequency (OpenAI: output tokens only, subtract pres + freq x count)."""
    s, v = logits_SV.shape
    dev = logits_SV.device
    rep = torch.tensor([q.params.repetition_penalty for q in seqs], device=dev)[:, None]
    pres = torch.tensor([q.params.presence_penalty for q in seqs], device=dev)[:, None]
    freq = torch.tensor([q.params.frequency_penalty for q in seqs], device=dev)[:, None]
    out_SL = _padded([q.output_token_ids for q in seqs], v, dev)
    counts_SV = torch.zeros(s, v + 1, device=dev).scatter_add_(1, out_SL, torch.ones(out_SL.shape, device=dev))[:, :v]
    if bool((rep != 1).any()):
        prompt_SL = _padded([q.token_ids[:q.num_prompt_tokens] for q in seqs], v, dev)
        seen_SV = torch.zeros(s, v + 1, dtype=torch.bool, device=dev).scatter_(1, prompt_SL, True)[:, :v]
        seen_SV |= counts_SV > 0
        penalised = torch.where(logits_SV > 0, logits_SV / rep, logits_SV * rep)
        logits_SV = torch.where(seen_SV, penalised, logits_SV)
    return logits_SV - freq * counts_SV - pres * (counts_SV > 0).float()


def truncate(logits_SV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
             ) -> torch.Tensor:
    """Mask (to -inf) tokens outside top_k [S] (0 = off), the top_p [S] nucleus, or below min_p [S]
    x the top probability. The most likely token always survives."""
    v = logits_SV.shape[-1]
    if bool(((top_k > 0) & (top_k < v)).any()) or bool((top_p < 1).any()):
        sorted_SV, idx_SV = logits_SV.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=v), v)
        ranks = torch.arange(v, device=logits_SV.device)[None]
        drop_SV = ranks >= k[:, None]
        probs_SV = sorted_SV.masked_fill(drop_SV, float("-inf")).softmax(-1)
        before_SV = probs_SV.cumsum(-1) - probs_SV        # mass of the better tokens
        drop_SV |= before_SV >= top_p[:, None]
        drop_SV[:, 0] = False
        logits_SV = logits_SV.masked_fill(torch.zeros_like(drop_SV).scatter_(1, idx_SV, drop_SV), float("-inf"))
    if bool((min_p > 0).any()):
        probs_SV = logits_SV.softmax(-1)
        logits_SV = logits_SV.masked_fill(probs_SV < min_p[:, None] * probs_SV.max(-1, keepdim=True).values,
                                          float("-inf"))
    return logits_SV


def _plain_greedy(q: Sequence) -> bool:
    """Greedy, no logprobs, no penalties, no stop ids masked for min_tokens: the token is the argmax."""
    p = q.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1 and not p.presence_penalty
            and not p.frequency_penalty and not (q.state is not None and q.state.sampling.processors)
            and not (q.num_output_tokens < p.min_tokens and q.state is not None and q.state.sampling.stop_ids))


class Sampler:
    """``sampler(logits [S, V], seqs) -> (token ids, per-row logprob dicts or None)``.

    argmax: the backend's greedy argmax (``ernie45.accel``: logits [S, V] -> int64 [S], or None where it does not
    take them), run on the raw logits when every row is plain greedy: the same token as the path below."""

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> None:
        self.argmax = argmax

    def __call__(self, logits_SV: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict | None]]:
        params = [q.params for q in seqs]
        if self.argmax is not None and all(_plain_greedy(q) for q in seqs):
            tokens = self.argmax(logits_SV)
            if tokens is not None:
                return tokens.tolist(), [None] * len(seqs)
        logits_SV = logits_SV.float()
        dev = logits_SV.device
        want_lp = [p.logprobs for p in params]
        raw_SV = logits_SV.log_softmax(-1) if any(k is not None for k in want_lp) else None
        if any(p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params):
            logits_SV = apply_penalties(logits_SV, seqs)
        for i, q in enumerate(seqs):
            if q.num_output_tokens < q.params.min_tokens and q.state is not None and q.state.sampling.stop_ids:
                logits_SV[i, q.state.sampling.stop_ids] = float("-inf")
        # Logits processors (logit_bias, grammar masks, ...): one place, after penalties, before any pick.
        if any(q.state is not None and q.state.sampling.processors for q in seqs):
            apply_processors(logits_SV, seqs)
        tokens_S = logits_SV.argmax(-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=dev)
            temp = torch.tensor([params[i].temperature for i in random_rows], device=dev)
            sub_SV = logits_SV[rows] / temp[:, None]
            sub_SV = truncate(
                sub_SV,
                torch.tensor([max(params[i].top_k, 0) for i in random_rows], device=dev),
                torch.tensor([params[i].top_p for i in random_rows], device=dev),
                torch.tensor([params[i].min_p for i in random_rows], device=dev))
            probs_SV = sub_SV.softmax(-1)
            q_SV = torch.empty_like(probs_SV)
            for j, i in enumerate(random_rows):
                gen = seqs[i].state.sampling.generator if seqs[i].state is not None else None
                q_SV[j].exponential_(generator=gen)
            tokens_S[rows] = (probs_SV / q_SV).argmax(-1)
        tokens = tokens_S.tolist()
        logprobs: list[dict | None] = [None] * len(seqs)
        if raw_SV is not None:
            lp_rows = [i for i, k in enumerate(want_lp) if k is not None]
            kmax = max(want_lp[i] for i in lp_rows)
            rows = torch.tensor(lp_rows, device=dev)
            top_v, top_i = raw_SV[rows].topk(kmax, dim=-1) if kmax else (None, None)
            chosen = raw_SV[rows, tokens_S[rows]].tolist()
            top_v = top_v.tolist() if kmax else None
            top_i = top_i.tolist() if kmax else None
            for j, i in enumerate(lp_rows):
                d = {tokens[i]: chosen[j]}
                for t, lp in zip((top_i[j][:want_lp[i]] if kmax else []), (top_v[j][:want_lp[i]] if kmax else [])):
                    d.setdefault(t, lp)
                logprobs[i] = d
        return tokens, logprobs
