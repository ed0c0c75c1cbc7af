"""Speculative decoding with the checkpoint's own MTP block (spec §3.4): drafting and exact verification.

Drafting. The MTP block maps (the main model's final hidden state ``h_t``, the token ``x_{t+1}``) to draft logits
for ``x_{t+2}``. It is a decoder layer with its own KV cache (the engine's layer slot ``L``), filled at position
``t`` for every pair whose ``h_t`` the main model has computed: after each step the engine runs the block over the
pairs of the positions that step made valid (a prefill chunk, a decode token, the accepted part of a
verification). The last pair gives draft 1; draft ``j + 1`` applies the block again to its own normalised output
and draft ``j``, at the next position of the slot, attending to the verified pairs and the chain's earlier drafts
(a head trained only one step deep accepts later drafts less often: the trainer's ``mtp_depth`` trains the block for
this recursion; the output stays exact whatever the drafts are). All sequences of a step draft together: one MTP
forward per depth, one decode row per sequence (``ModelRunner.mtp_draft``), greedy drafts one argmax call.

Verification (standard speculative sampling, Leviathan et al. 2023 / Chen et al. 2023). The target model scores
the last token and the k drafts in one forward (k + 1 query positions of the sequence over its paged cache). Draft
``d_j``, drawn from ``q_j``, is accepted with probability ``min(1, p_j(d_j) / q_j(d_j))``, where ``p_j`` is the
distribution the sampler would draw from at that position with every processor applied (temperature, top-k/p,
min-p, penalties and min_tokens over the history including the accepted drafts: :func:`sampler.target_probs`).
At the first rejection the token is drawn from ``normalise(max(0, p_j - q_j))`` and the step ends; if all k are
accepted a bonus token is drawn from ``p_{k+1}``. Each emitted token is then distributed exactly as without
speculation. Greedy rows have one-hot ``p`` and ``q``: a draft is accepted iff it is the argmax, so greedy output
is token-identical to plain decoding; for greedy requests with nothing reading the history (:func:`plain_greedy`)
the engine takes the argmax of all their verified rows in one call and compares (:func:`verify_greedy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie45.engine.sampler import random_probs, target_probs


@dataclass
class Draft:
    """A sequence's proposals for the next verification: tokens and the distributions they were drawn from
    (None rows for greedy requests: one-hot at the token)."""

    tokens: list[int]
    probs: torch.Tensor | None   # [k, V] fp32, or None when greedy


class HistoryView:
    """A sequence as the sampler sees it after ``extra`` tokens were appended (the accepted drafts before a
    position): what penalties and min_tokens read."""

    __slots__ = ("extra", "seq")

    def __init__(self, seq, extra: list[int]) -> None:  # noqa: ANN001 - a Sequence
        self.seq, self.extra = seq, extra

    @property
    def params(self):  # noqa: ANN201
        return self.seq.params

    @property
    def state(self):  # noqa: ANN201
        return self.seq.state

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.extra

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.extra

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + len(self.extra)


def residual(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """Where a rejected position draws from: normalise(max(0, p - q)); p itself if p <= q everywhere."""
    r = (p_V - q_V).clamp(min=0)
    total = float(r.sum())
    return r / total if total > 0 else p_V


def _draw(probs_V: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs_V, 1, generator=generator))


def verify(logits_JV: torch.Tensor, seq, draft: Draft) -> tuple[int, list[int]]:  # noqa: ANN001
    """Accept a prefix of ``draft`` against the target logits of the k + 1 verified positions.

    Returns (number of drafts accepted, the tokens to append: the accepted drafts then one more token).
    """
    k = len(draft.tokens)
    if logits_JV.shape[0] != k + 1:
        raise ValueError(f"verification needs {k + 1} rows of logits for {k} drafts; got {logits_JV.shape[0]}")
    views = [HistoryView(seq, draft.tokens[:j]) for j in range(k + 1)]
    p_JV = target_probs(logits_JV, views)
    gen = seq.state.sampling.generator if seq.state is not None else None
    greedy = seq.params.greedy
    for j, d in enumerate(draft.tokens):
        if greedy:
            best = int(p_JV[j].argmax())
            if best != d:
                return j, draft.tokens[:j] + [best]
            continue
        p_d = float(p_JV[j, d])
        q_d = float(draft.probs[j, d]) if draft.probs is not None else 1.0
        u = float(torch.rand((), generator=gen))
        if q_d > 0 and u * q_d < p_d:  # u < min(1, p/q) without dividing
            continue
        q_V = draft.probs[j] if draft.probs is not None else torch.nn.functional.one_hot(
            torch.tensor(d), p_JV.shape[1]).float()
        return j, draft.tokens[:j] + [_draw(residual(p_JV[j], q_V), gen)]
    last = int(p_JV[k].argmax()) if greedy else _draw(p_JV[k], gen)
    return k, draft.tokens + [last]


def plain_greedy(seq) -> bool:  # noqa: ANN001 - a Sequence
    """Greedy with nothing that reads the history (no penalties, logit processors or logprobs; min_tokens reached):
    the token at every verified position is the argmax of the raw logits, so verification is a comparison."""
    p = seq.params
    return (p.greedy and p.logprobs is None and p.repetition_penalty == 1 and not p.presence_penalty
            and not p.frequency_penalty and not (seq.state is not None and seq.state.sampling.processors)
            and (seq.num_output_tokens >= p.min_tokens or seq.state is None or not seq.state.sampling.stop_ids))


def verify_greedy(best: list[int], drafts: list[int]) -> tuple[int, list[int]]:
    """:func:`verify` for a :func:`plain_greedy` sequence from the argmax of each verified row (``best``, k + 1
    entries): the drafts up to the first that is not the argmax, then the argmax there."""
    for j, d in enumerate(drafts):
        if best[j] != d:
            return j, drafts[:j] + [best[j]]
    return len(drafts), drafts + [best[len(drafts)]]


def draft_tokens(logits_SV: torch.Tensor, seqs: list, argmax=None  # noqa: ANN001 - the backend's argmax or None
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One draft token per sequence from MTP logits: the argmax for greedy requests (all greedy rows in one call,
    ``argmax`` the backend's when given), else a draw from the request's own temperature/top-k/top-p/min-p
    distribution (its generator). Returns (tokens int64 [S], the q rows or None)."""
    greedy = [seq.params.greedy for seq in seqs]
    tokens_S = argmax(logits_SV) if argmax is not None else None
    if tokens_S is None:
        tokens_S = logits_SV.argmax(-1)
    qs: list[torch.Tensor | None] = [None] * len(seqs)
    if all(greedy):
        return tokens_S, qs
    rand = [i for i, g in enumerate(greedy) if not g]
    q_RV = random_probs(logits_SV[rand].float(), [seqs[i].params for i in rand])
    for n, i in enumerate(rand):
        gen = seqs[i].state.sampling.generator if seqs[i].state is not None else None
        tokens_S[i] = _draw(q_RV[n], gen)
        qs[i] = q_RV[n]
    return tokens_S, qs


class _ModeState:
    """The controller's measurements and choice for one batch-size bucket."""

    __slots__ = ("age", "drafting", "n", "rate", "secs", "tokens", "trying", "wait")

    def __init__(self, explore: int) -> None:
        self.drafting = True
        self.rate: dict[bool, float | None] = {True: None, False: None}
        self.age = {True: 0, False: 0}   # windows since each mode was last measured
        self.wait = {True: explore, False: explore}  # windows a mode waits before it is re-tried
        self.trying = False  # the current window re-tries its mode
        self.n, self.tokens, self.secs = 0, 0, 0.0


class DraftController:
    """``speculative_adaptive``: draft only while drafting is faster, by measurement.

    Whether drafting pays depends on what the step is bound by: memory-bound decode (a large model, small batches)
    verifies k + 1 tokens for about the price of one; a compute-bound one (a small model whose weights sit in cache,
    large batches) pays for each row, and the drafts on top. So the choice is made per batch-size bucket (1, 2-3,
    4-7, 8-15, ...: :meth:`bucket`), each on its own measurements. In a bucket, the engine runs windows of ``window``
    steps in one mode (drafting or plain) and keeps each mode's measured tokens a second (its last window's,
    averaged with the one before when that was the same mode's, so one noisy window decides less). After each
    window it takes the faster mode, and tries the other again once that is ``explore`` windows old, so a change of
    load or acceptance is seen; each time a re-try loses, that mode waits twice as long for the next (up to
    ``max_wait`` windows), and a re-try that wins resets the wait, so a mode that keeps losing costs ever fewer
    steps. The engine times its steps (``LLMEngine._clock``), asks :meth:`mode` before drafting and calls
    :meth:`record` after each step."""

    def __init__(self, window: int = 16, explore: int = 8, max_wait: int = 128) -> None:
        if window < 1 or explore < 1 or max_wait < explore:
            raise ValueError(f"window={window}, explore={explore} must be >= 1 and max_wait={max_wait} >= explore")
        self.window, self.explore, self.max_wait = window, explore, max_wait
        self.buckets: dict[int, _ModeState] = {}
        self.last = 1  # the bucket of the last step
        self.steps = {True: 0, False: 0}  # steps run in each mode, in all
        self.switches = 0

    @staticmethod
    def bucket(batch: int) -> int:
        """The bucket of a step of ``batch`` sequences: 1, 2-3, 4-7, ... -> 1, 2, 3, ..."""
        return max(1, int(batch).bit_length())

    def state(self, batch: int) -> _ModeState:
        b = self.bucket(batch)
        st = self.buckets.get(b)
        if st is None:
            st = self.buckets[b] = _ModeState(self.explore)
        return st

    def mode(self, batch: int) -> bool:
        """Whether a step of ``batch`` sequences drafts."""
        return self.state(batch).drafting

    @property
    def drafting(self) -> bool:
        """The mode of the last step's bucket."""
        st = self.buckets.get(self.last)
        return True if st is None else st.drafting  # a bucket starts drafting

    def record(self, tokens: int, secs: float, batch: int = 1) -> None:
        """One engine step of ``batch`` sequences in its bucket's current mode: the tokens it emitted, its wall
        time."""
        st = self.state(batch)
        self.last = self.bucket(batch)
        self.steps[st.drafting] += 1
        st.n += 1
        st.tokens += tokens
        st.secs += secs
        if st.n < self.window:
            return
        mode = st.drafting
        r = st.tokens / st.secs if st.secs > 0 else 0.0
        recent = st.rate[mode] is not None and st.age[mode] == 0  # this mode's previous window too
        st.rate[mode] = 0.5 * (st.rate[mode] + r) if recent else r
        st.age[mode] = 0
        st.age[not mode] += 1
        st.n, st.tokens, st.secs = 0, 0, 0.0
        other = not mode
        if st.trying and st.rate[other] is not None:  # a re-try ends: back off if it lost
            lost = st.rate[mode] < st.rate[other]
            st.wait[mode] = min(2 * st.wait[mode], self.max_wait) if lost else self.explore
        st.trying = st.rate[other] is None or st.age[other] >= st.wait[other]
        best = other if st.trying else st.rate[True] >= st.rate[False]
        if best != mode:
            self.switches += 1
        st.drafting = best
