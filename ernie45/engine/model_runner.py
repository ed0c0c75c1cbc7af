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


@dataclass
class DraftPositions:
    """The MTP cache slots of a step's recursive drafts (``ModelRunner.draft_positions``): J depths x S sequences."""

    tables_SB: torch.Tensor   # [S, B] int64 block tables, padded with 0
    pos_JS: torch.Tensor      # [J, S] int64 position of each draft's pair
    slots_JS: torch.Tensor    # [J, S] int64 its cache slot
    lens_JS: torch.Tensor     # [J, S] int64 context length (position + 1)
    mask_JSL: torch.Tensor    # [J, S, B * block_size] bool: key position < context length


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

    def draft_positions(self, seqs: list[Sequence], budgets: list[int]) -> DraftPositions:
        """Where drafts 2 .. k of each sequence go in the MTP cache slot (the positions after its last verified
        pair, see :meth:`mtp_draft`), k = its budget: every depth's slots and context lengths built at once (up to
        the largest budget), so each drafting forward only slices them. Their blocks are allocated already (the
        engine's lookahead, for each sequence's own budget only: a depth past a sequence's budget, which never runs
        for it, repeats its last position instead of reading past its block table)."""
        bs = self.kv.block_size
        tables = [s.block_table for s in seqs]
        width = max(map(len, tables))
        tables_SB = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=self.device)
        pos = [[s.num_tokens - 1 + max(0, min(j, k - 2)) for s, k in zip(seqs, budgets)]  # depth j + 2 of each
               for j in range(max(budgets) - 1)]
        slots_JS = torch.tensor([[t[p // bs] * bs + p % bs for t, p in zip(tables, row)] for row in pos],
                                dtype=torch.long, device=self.device)
        lens_JS = torch.tensor(pos, dtype=torch.long, device=self.device) + 1
        mask_JSL = torch.arange(width * bs, device=self.device) < lens_JS[..., None]
        return DraftPositions(tables_SB, torch.tensor(pos, dtype=torch.long, device=self.device), slots_JS, lens_JS,
                              mask_JSL)

    @torch.inference_mode()
    def mtp_draft(self, at: DraftPositions, depth: int, rows: torch.Tensor | None, hidden_SH: torch.Tensor,
                  tokens_S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recursive drafting forward of the MTP block: each sequence's previous output ``hidden_SH`` [S, H] and
        last draft ``tokens_S`` [S] at its slot of ``depth`` (0 = the second draft), one decode row each, then the
        head. ``rows``: the sequences of ``at`` still drafting (None = all). Returns (outputs [S, H], logits [S, V])."""
        slots, lens, pos, mask = at.slots_JS[depth], at.lens_JS[depth], at.pos_JS[depth], at.mask_JSL[depth]
        tables = at.tables_SB
        if rows is not None:
            slots, lens, pos, mask, tables = slots[rows], lens[rows], pos[rows], mask[rows], tables[rows]
        n = tokens_S.shape[0]
        meta = AttentionMetadata(slots, [1] * n, lens.tolist(), tables, num_decodes=n, num_decode_tokens=n,
                                 decode_mask=mask[:, None, None], decode_lens=lens, decode_tables=tables)
        h = self.model.mtp_hidden(hidden_SH[None], tokens_S[None], pos[None], cache=self.attention.step(meta))[0]
        return h, self.model.lm_head(h)

    @torch.inference_mode()
    def mtp(self, items: list[MTPItem]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the MTP block over every item's pairs in one forward through its cache slot. Returns (the block's
        normalised output at each item's last pair [I, H], draft logits [R, V] for the items that want them, in
        item order)."""
        # The pairs of a decode or of a verification's accepted part (at most 17: speculative_tokens <= 16) run as
        # decode rows (one query each over the slot, as the verification itself does); prefill chunks as chunks.
        small = [len(it.next_ids) <= 17 for it in items]
        order = sorted(range(len(items)), key=lambda i: not small[i])  # decode rows first
        ids, pos, hidden, last = [], [], [], [0] * len(items)
        for i in order:
            it = items[i]
            ids.extend(it.next_ids)
            pos.extend(range(it.start, it.start + len(it.next_ids)))
            hidden.append(it.hidden_TH)
            last[i] = len(ids) - 1
        meta = AttentionMetadata.build(
            [items[i].seq.block_table for i in order], [len(items[i].next_ids) for i in order],
            [items[i].start + len(items[i].next_ids) for i in order], self.kv.block_size, self.device,
            num_decodes=sum(small))
        h = self.model.mtp_hidden(torch.cat(hidden)[None], torch.tensor([ids], device=self.device),
                                  torch.tensor([pos], device=self.device), cache=self.attention.step(meta))[0]
        one_each = len(ids) == len(items) and order == list(range(len(items)))  # row i is item i's last pair
        out_IH = h if one_each else h[torch.tensor(last, device=self.device)]
        want = [i for i, it in enumerate(items) if it.want_logits]
        if len(want) < len(items):
            return out_IH, self.model.lm_head(out_IH[torch.tensor(want, device=self.device)]) if want else None
        return out_IH, self.model.lm_head(out_IH)
