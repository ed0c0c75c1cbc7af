"""Scheduled sequences -> flat input tensors + attention metadata -> one forward -> logits.

Every scheduled token of every sequence goes into one row ``input_ids [1, T]`` with explicit positions;
logits are computed only for the last token of the sequences that sample this step (``logits_indices``),
since the LM head over a 103k vocabulary is the largest matmul of a decode step. The model receives the
attention backend's context for the step (``attention.step(meta)``) as its ``cache``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie45.accel import AttentionMetadata, PagedAttention, backend_of
from ernie45.config import ModelConfig
from ernie45.engine.kv_cache import KVCache
from ernie45.engine.scheduler import ScheduledSeq
from ernie45.engine.sequence import Sequence
from ernie45.model.model import ErnieForCausalLM


@dataclass
class StepLayout:
    """Where the last step put each scheduled sequence: its first row in the flat batch, its computed count when
    the step began, and for the sequences that sample, the first of their logits rows (1 + num_spec rows: the
    last known token, then each draft of a verification). The engine's MTP pass reads it with the step's final
    hidden states."""

    scheduled: list[ScheduledSeq]
    offsets: list[int]
    starts: list[int]
    logits_rows: dict[int, int]        # seq_id -> first logits row
    hidden_TH: torch.Tensor | None = None


@dataclass
class MTPItem:
    """One sequence's pairs for the MTP block: positions start .. start + len(next_ids) - 1 of its own cache slot,
    the main model's hidden states there and the tokens one position later."""

    seq: Sequence
    start: int
    hidden_TH: torch.Tensor
    next_ids: list[int]
    want_logits: bool


class ModelRunner:
    """Runs each step's forward on this process. ``LLMEngine(runner=...)`` takes this class or a subclass
    (``ernie45.parallel.runner.DistributedModelRunner`` for a model split over ranks)."""

    @classmethod
    def cache_config(cls, model: ErnieForCausalLM) -> ModelConfig:
        """The config this process's KV cache is sized with (a sharded model holds only its own heads)."""
        return model.config

    def __init__(self, model: ErnieForCausalLM, kv_cache: KVCache, attention: PagedAttention | None = None) -> None:
        """attention: the paged attention over ``kv_cache`` (default: that of the model's backend)."""
        self.model = model
        self.kv = kv_cache
        self.attention = attention if attention is not None else backend_of(model).attention(kv_cache)
        self.device = next(model.parameters()).device
        self.last: StepLayout | None = None

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                              list[int], list[Sequence]]:
        """Decodes (one new token, or the last token and the drafts of a speculative verification: decode rows of
        the attention backend) first, then chunks; returns (input_ids [1, T], positions [T], metadata, logits
        rows, the sequences those rows belong to)."""
        def is_decode(s: ScheduledSeq) -> bool:
            return s.num_new_tokens == 1 or s.num_new_tokens - s.num_spec == 1

        order = sorted(scheduled, key=lambda s: not is_decode(s))  # stable: keeps scheduler order
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        sample_seqs: list[Sequence] = []
        layout = StepLayout(order, [], [], {})
        for sch in order:
            seq, start = sch.seq, sch.seq.num_computed_tokens
            end = start + sch.num_new_tokens - sch.num_spec
            layout.offsets.append(len(ids))
            layout.starts.append(start)
            ids.extend(seq.token_ids[start:end])
            if sch.num_spec:
                ids.extend(seq.draft.tokens[:sch.num_spec])
            positions.extend(range(start, end + sch.num_spec))
            if end == seq.num_tokens:  # this step reaches the last known token: sample the next one
                layout.logits_rows[seq.seq_id] = len(rows)
                rows.extend(range(len(ids) - 1 - sch.num_spec, len(ids)))
                sample_seqs.append(seq)
        self.last = layout
        meta = AttentionMetadata.build(
            [s.seq.block_table for s in order], [s.num_new_tokens for s in order],
            [s.seq.num_computed_tokens + s.num_new_tokens for s in order], self.kv.block_size, self.device,
            num_decodes=sum(map(is_decode, order)))
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return input_ids, pos, meta, rows, sample_seqs

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step. Returns the sequences that sample and their logits ``[R, V]`` (the model's dtype: the
        sampler takes them to fp32 where it needs to; a greedy batch takes the argmax as they are)."""
        input_ids, pos, meta, rows, sample_seqs = self.prepare(scheduled)
        out = self.model(input_ids, position_ids=pos[None], cache=self.attention.step(meta),
                         logits_indices=torch.tensor(rows, dtype=torch.long, device=self.device),
                         compute_logits=bool(rows))
        self.last.hidden_TH = out.hidden_states[0]
        return sample_seqs, (out.logits if rows else None)

    @torch.inference_mode()
    def mtp(self, items: list[MTPItem]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the MTP block over every item's pairs in one forward through its cache slot. Returns (the block's
        normalised output at each item's last pair [I, H], draft logits [R, V] for the items that want them, in
        item order)."""
        order = sorted(range(len(items)), key=lambda i: len(items[i].next_ids) != 1)  # decodes first
        ids, pos, hidden, last = [], [], [], [0] * len(items)
        for i in order:
            it = items[i]
            ids.extend(it.next_ids)
            pos.extend(range(it.start, it.start + len(it.next_ids)))
            hidden.append(it.hidden_TH)
            last[i] = len(ids) - 1
        meta = AttentionMetadata.build(
            [items[i].seq.block_table for i in order], [len(items[i].next_ids) for i in order],
            [items[i].start + len(items[i].next_ids) for i in order], self.kv.block_size, self.device)
        h = self.model.mtp_hidden(torch.cat(hidden)[None], torch.tensor([ids], device=self.device),
                                  torch.tensor([pos], device=self.device), cache=self.attention.step(meta))[0]
        out_IH = h[torch.tensor(last, device=self.device)]
        want = [i for i, it in enumerate(items) if it.want_logits]
        logits = self.model.lm_head(out_IH[torch.tensor(want, device=self.device)]) if want else None
        return out_IH, logits
