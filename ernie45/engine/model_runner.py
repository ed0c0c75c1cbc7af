"""Scheduled sequences -> flat input tensors + attention metadata -> one forward -> logits.

Every scheduled token of every sequence goes into one row ``input_ids [1, T]`` with explicit positions;
logits are computed only for the last token of the sequences that sample this step (``logits_indices``),
since the LM head over a 103k vocabulary is the largest matmul of a decode step. The model receives the
attention backend's context for the step (``attention.step(meta)``) as its ``cache``.
"""

from __future__ import annotations

import torch

from ernie45.accel import AttentionMetadata, PagedAttention, backend_of
from ernie45.config import ModelConfig
from ernie45.engine.kv_cache import KVCache
from ernie45.engine.scheduler import ScheduledSeq
from ernie45.engine.sequence import Sequence
from ernie45.model.model import ErnieForCausalLM


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

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                              list[int], list[Sequence]]:
        """Decodes (one new token) first, then chunks; returns (input_ids [1, T], positions [T],
        metadata, logits rows, the sequences those rows belong to)."""
        order = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)  # stable: keeps scheduler order
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for sch in order:
            seq, start = sch.seq, sch.seq.num_computed_tokens
            end = start + sch.num_new_tokens
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            if end == seq.num_tokens:  # this step reaches the last known token: sample the next one
                rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata.build(
            [s.seq.block_table for s in order], [s.num_new_tokens for s in order],
            [s.seq.num_computed_tokens + s.num_new_tokens for s in order], self.kv.block_size, self.device)
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
        return sample_seqs, (out.logits if rows else None)
