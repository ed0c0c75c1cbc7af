"""One completion being generated: its tokens, how many are in the KV cache, its blocks, its state.

Plain Python (no tensors) so the scheduler and block manager are unit-testable without a model.
A request with ``n > 1`` owns n sequences; sequence 0 prefills the prompt and the others are forked
from it afterwards (sharing the prompt's full KV blocks, see ``Scheduler._fork``).
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

from ernie45.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # in the waiting queue (new, or preempted and to be recomputed)
    RUNNING = "running"        # holds KV blocks and is scheduled every step
    FORK_PENDING = "pending"   # an n>1 sibling waiting for sequence 0's prompt to be computed
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """Token bookkeeping of one completion.

    ``token_ids`` holds the prompt then the generated tokens. ``num_computed_tokens`` of them have
    their keys/values in the cache; the scheduler computes the rest (a prompt chunk, or the last
    sampled token during decode). A token is sampled when a step brings the count to ``num_tokens``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                 index: int = 0, arrival: int | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        """Completion index within the request (0..n-1)."""
        self.arrival = self.seq_id if arrival is None else arrival
        """Ordering key: lower = older. Preemption picks the highest (newest) first."""
        self.params = params or SamplingParams()
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens served from the prefix cache at the first schedule."""
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        """Chained hashes of the full blocks registered in the prefix cache, in order."""
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.children: list[Sequence] = []
        """n>1 siblings forked from this one once its prompt is computed."""
        self.num_preemptions = 0
        self.state: Any = None
        """Engine-side per-sequence state (detokenizer, logprobs, generator); opaque here."""
        self.draft: Any = None
        """Speculative draft tokens to verify at the next decode step (``engine.speculative.Draft``), or None."""
        self.mtp_pending: Any = None
        """(first position, hidden-state rows, count) of pairs whose MTP pass an adaptive engine deferred, or None."""

    # ------------------------------------------------------------------ tokens
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token awaits computation (prompt, or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}#{self.index}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")
