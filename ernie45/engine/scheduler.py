"""Continuous batching with chunked prefill and preemption (vLLM V1 style token budget).

Plain Python (no tensors). Every step each sequence is given a number of new tokens to compute:
running decodes first (one token each), then running sequences still in prefill, then waiting ones
(oldest first), until ``max_num_batched_tokens`` is spent. A long prompt is thus split into chunks
across steps. When the KV blocks run out, the newest running sequence is preempted: its blocks are
freed and it goes back to the front of the waiting queue to be recomputed later (prefix caching often
makes that cheap).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from ernie45.engine.block_manager import BlockManager
from ernie45.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    """Tokens computed for this sequence this step: token_ids[num_computed : num_computed + this], then the
    first ``num_spec`` draft tokens (``seq.draft``) of a speculative verification."""
    num_spec: int = 0

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so the next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_spec == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs} and max_num_batched_tokens="
                             f"{max_num_batched_tokens} must both be >= 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in the order they started running (oldest first)
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0
        self.prompt_tokens_computed = 0
        """Tokens actually run through the model for prompts/recompute (not served from the cache)."""

    # ------------------------------------------------------------------ queue changes
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark ``seq`` finished (stop / length / abort) and release its blocks. Forks that never
        started finish with it."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        for child in seq.children:
            if child.status is SequenceStatus.FORK_PENDING:
                self.finish(child, reason, stop_reason)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes first: their latency is what users see; long prefills take what is left.
        order = sorted(self.running, key=lambda s: (s.is_prefill, s.arrival))
        scheduled_ids: dict[int, ScheduledSeq] = {}
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            spec = len(seq.draft.tokens) if seq.draft is not None and not seq.is_prefill else 0
            num_new = min(seq.num_uncomputed_tokens + spec, budget)
            while not self.bm.can_allocate(seq, seq.num_computed_tokens + num_new):
                victim = max((s for s in self.running), key=lambda s: s.arrival)
                budget += self._preempt(victim, out, scheduled_ids)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.bm.allocate(seq, seq.num_computed_tokens + num_new)
            sch = ScheduledSeq(seq, num_new, max(0, num_new - seq.num_uncomputed_tokens))
            out.scheduled.append(sch)
            scheduled_ids[seq.seq_id] = sch
            budget -= num_new
        # New work only when nothing had to be preempted (otherwise it would thrash).
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.bm.match_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.bm.can_allocate(seq, num_cached + num_new, cached):
                break  # FCFS: the head waits for blocks; younger requests do not jump it
            self.waiting.popleft()
            self.bm.allocate(seq, num_cached + num_new, cached)
            seq.num_computed_tokens = num_cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
            self.prefix_cache_hit_tokens += num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            sch = ScheduledSeq(seq, num_new)
            out.scheduled.append(sch)
            budget -= num_new
        return out

    def _preempt(self, victim: Sequence, out: SchedulerOutput, scheduled_ids: dict[int, ScheduledSeq]) -> int:
        """Free ``victim``'s blocks and requeue it for recompute. Returns the budget it gave back."""
        log.debug("preempting %r", victim)
        self.running.remove(victim)
        self.bm.free(victim)
        victim.status = SequenceStatus.WAITING
        victim.num_computed_tokens = 0
        victim.draft = None  # its drafts' MTP context is gone with the blocks
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim)
        sch = scheduled_ids.pop(victim.seq_id, None)
        if sch is None:
            return 0
        out.scheduled.remove(sch)
        return sch.num_new_tokens

    def update(self, out: SchedulerOutput) -> list[Sequence]:
        """After the forward: advance ``num_computed_tokens``, register full blocks in the prefix
        cache, and fork the n>1 siblings of sequences whose prompt is now computed. Returns the
        sequences that get a sampled token this step (the caller appends it)."""
        sampled = []
        for sch in out.scheduled:
            seq = sch.seq
            samples = sch.samples
            if seq.num_output_tokens == 0 or seq.num_computed_tokens < seq.num_tokens - 1:
                self.prompt_tokens_computed += sch.num_new_tokens
            seq.num_computed_tokens += sch.num_new_tokens - sch.num_spec  # accepted drafts: the engine adds them
            self.bm.commit(seq)
            if samples:
                sampled.append(seq)
                if seq.children and seq.num_output_tokens == 0:
                    self._fork(seq)
        return sampled

    def _fork(self, parent: Sequence) -> None:
        """Start the siblings of ``parent``: they share its full prompt blocks and recompute only the
        tail (< one block, at least one token) so each samples its own first token."""
        bs = self.bm.block_size
        shared = (parent.num_prompt_tokens - 1) // bs
        for child in parent.children:
            if child.status is not SequenceStatus.FORK_PENDING:
                continue
            self.bm.fork(parent, child, shared)
            child.num_computed_tokens = shared * bs
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
