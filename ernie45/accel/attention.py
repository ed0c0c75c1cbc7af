"""Paged attention: the step metadata, the per-step context the model receives as ``cache``, and the torch
reference backend (``ernie45.accel.cpu.attention`` is the native one; a GPU backend goes beside it).

The KV cache (``ernie45.engine.kv_cache.KVCache``) is storage: per-layer K/V tensors ``[num_blocks, block_size,
kv_heads, head_dim]``. A backend is bound to one cache; each step it wraps the step's metadata into an
:class:`AttentionStep`, which the model's attention calls as ``cache.attend(layer_idx, q, k, v)``: it writes the new
keys/values at their slots and attends each query over its sequence's cache. Nothing is parked on the cache.

The batch is flattened: input_ids ``[1, T]`` holds every scheduled token of every sequence, the *decode* sequences
first, then prefill chunks. A decode sequence has ``query_lens[i]`` tokens: one for an ordinary decode, several for
a verify step of speculative decoding; each of its tokens is a *decode row* attending to its sequence's cache up to
and including itself (row context length ``context_len - query_len + 1 + j``), so decode rows run on a one-query
kernel whatever their count. Prefill chunks attend causally within the chunk and fully over their cached context.

Shape suffixes: T tokens in the step, R decode rows, S sequences, B blocks per sequence, P block_size, L context
length, N query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to. ``query_lens[i]`` tokens of sequence i are in
    the batch, ``context_lens[i]`` positions of it are in the cache after this step (its cached context plus the new
    tokens). The first ``num_decodes`` sequences are decodes: their tokens are the decode rows."""

    slot_mapping_T: torch.Tensor          # [T] int64: block * block_size + offset of each new token
    query_lens: list[int]
    context_lens: list[int]
    block_tables_SB: torch.Tensor         # [S, B_max] int64, padded with 0 (masked out)
    num_decodes: int = 0
    """The first num_decodes sequences are decodes (one row per token, batched together)."""
    num_decode_tokens: int = 0
    """Their tokens: the first num_decode_tokens of the step, one decode row each."""
    decode_mask: torch.Tensor | None = None   # [R, 1, 1, L] bool: key position < the row's context length
    decode_lens: torch.Tensor | None = None   # [R] int64 context length of each decode row
    decode_tables: torch.Tensor | None = None  # [R, B_dec] int64 block table of each decode row, contiguous
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], context_lens: list[int],
              block_size: int, device: torch.device | str = "cpu", num_decodes: int | None = None
              ) -> AttentionMetadata:
        """Build the step's tensors once (all layers share them). Decodes come first: by default the leading
        sequences with one query token; ``num_decodes`` makes the first that many decodes whatever their query
        lengths (a verify step: several tokens of a sequence checked at once)."""
        if num_decodes is None:
            num_decodes = 0
            while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
                num_decodes += 1
        if not 0 <= num_decodes <= len(query_lens):
            raise ValueError(f"num_decodes={num_decodes} outside [0, {len(query_lens)}] sequences")
        for i, (q, c) in enumerate(zip(query_lens, context_lens)):
            if not 0 < q <= c:
                raise ValueError(f"sequence {i}: query_len {q} must be in [1, context_len {c}]")
        slots = []
        for table, q, c in zip(block_tables, query_lens, context_lens):
            pos = range(c - q, c)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        meta = cls(torch.tensor(slots, dtype=torch.long, device=device), list(query_lens), list(context_lens),
                   tables.to(device), num_decodes)
        if num_decodes:
            width_d = max(len(t) for t in block_tables[:num_decodes])
            qd = query_lens[:num_decodes]
            meta.num_decode_tokens = sum(qd)
            if meta.num_decode_tokens == num_decodes:  # one row per sequence
                meta.decode_lens = torch.tensor(context_lens[:num_decodes], dtype=torch.long, device=device)
                meta.decode_tables = meta.block_tables_SB[:num_decodes, :width_d].contiguous()
            else:  # token j of a decode with q tokens and context c sees its sequence's first c - q + 1 + j
                lens = [c - q + 1 + j for q, c in zip(qd, context_lens[:num_decodes]) for j in range(q)]
                meta.decode_lens = torch.tensor(lens, dtype=torch.long, device=device)
                seq_of_row = torch.repeat_interleave(torch.arange(num_decodes), torch.tensor(qd)).to(device)
                meta.decode_tables = meta.block_tables_SB[seq_of_row, :width_d].contiguous()
            meta.decode_mask = (torch.arange(width_d * block_size, device=device)[None]
                                < meta.decode_lens[:, None])[:, None, None]
        for q, c in zip(query_lens[num_decodes:], context_lens[num_decodes:]):
            if q == c:
                meta.prefill_masks.append(None)  # no cached context: plain causal
            else:  # query i sits at position c - q + i and sees keys 0..c-q+i
                rows = torch.arange(c - q, c, device=device)[:, None]
                meta.prefill_masks.append(torch.arange(c, device=device)[None] <= rows)  # [q, c]
        return meta


class AttentionStep:
    """One step of one attention backend: what the model receives as ``cache`` (``AttentionCache``)."""

    def __init__(self, backend: PagedAttention, meta: AttentionMetadata) -> None:
        self.backend, self.meta = backend, meta

    def attend(self, layer_idx: int, q_TND: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
               ) -> torch.Tensor:  # -> [T, N, D]
        return self.backend.attend(self.meta, layer_idx, q_TND, k_TKD, v_TKD)


class PagedAttention:
    """The torch reference backend over one paged KV cache (CPU and GPU): decode rows are one batched matmul
    attention over the keys gathered by block table (GQA by head groups, padding masked); each prefill chunk is one
    SDPA call (causal within the chunk, full over its cached context). No Python work per token."""

    name = "torch"

    def __init__(self, cache: object) -> None:
        self.cache = cache  # an engine KVCache: .k/.v lists of [NB, P, K, D], .block_size, .num_kv_heads, .head_dim
        self.scale = cache.head_dim ** -0.5

    def step(self, meta: AttentionMetadata) -> AttentionStep:
        """The context the model runs this step with."""
        return AttentionStep(self, meta)

    # --------------------------------------------------------------------------------- the pieces
    def write(self, layer_idx: int, k_TKD: torch.Tensor, v_TKD: torch.Tensor, slots_T: torch.Tensor) -> None:
        """Store this step's keys/values at their slots."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kh, d = kc.shape[2], kc.shape[3]
        kc.view(-1, kh, d).index_copy_(0, slots_T, k_TKD.to(kc.dtype))
        vc.view(-1, kh, d).index_copy_(0, slots_T, v_TKD.to(vc.dtype))

    def decode(self, meta: AttentionMetadata, layer_idx: int, q_RND: torch.Tensor, out_dtype: torch.dtype
               ) -> torch.Tensor:
        """Attention of the decode rows (one query each) over their cached keys -> [R, N, D] in ``out_dtype``.

        fp32 (as SDPA accumulates): two batched matmuls and a softmax. For one query this is several times faster
        on CPU than SDPA's masked GQA path (~260 us a layer at the 21B shape), and the same math. Query head h reads
        kv head h // (N / K)."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        keys = kc[meta.decode_tables].flatten(1, 2).transpose(1, 2)     # [R, K, L, D]
        vals = vc[meta.decode_tables].flatten(1, 2).transpose(1, 2)
        r, n, d = q_RND.shape
        k = keys.shape[1]
        q = q_RND.float().view(r, k, n // k, d)                                       # [R, K, G, D]
        scores = torch.matmul(q, keys.float().transpose(-1, -2)) * self.scale          # [R, K, G, L]
        scores = scores.masked_fill(~meta.decode_mask[:, 0][:, :, None], float("-inf"))
        return torch.matmul(scores.softmax(-1), vals.float()).view(r, n, d).to(out_dtype)  # [R, N, D]

    def attend(self, meta: AttentionMetadata, layer_idx: int, q_TND: torch.Tensor, k_TKD: torch.Tensor,
               v_TKD: torch.Tensor) -> torch.Tensor:
        """Write this step's k/v at the slot mapping, then attend each token over its sequence's cache."""
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]             # [NB, P, K, D]
        self.write(layer_idx, k_TKD, v_TKD, meta.slot_mapping_T)
        rd = meta.num_decode_tokens
        if rd and rd == q_TND.shape[0]:  # a decode-only step: the decode rows are the whole result
            return self.decode(meta, layer_idx, q_TND, q_TND.dtype)
        out_TND = torch.empty_like(q_TND)
        if rd:
            out_TND[:rd] = self.decode(meta, layer_idx, q_TND[:rd], torch.float32).to(q_TND.dtype)
        start = rd
        bs = kc.shape[1]
        for i, mask in enumerate(meta.prefill_masks):
            s = meta.num_decodes + i
            ql, cl = meta.query_lens[s], meta.context_lens[s]
            q = q_TND[start:start + ql].transpose(0, 1)[None]      # [1, N, q, D]
            if mask is None:  # the whole context is this chunk: attend to the new k/v as they are
                keys = k_TKD[start:start + ql].transpose(0, 1)[None].to(q.dtype)
                vals = v_TKD[start:start + ql].transpose(0, 1)[None].to(q.dtype)
                o = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, scale=self.scale,
                                                   enable_gqa=True)
            else:
                nb = -(-cl // bs)
                table = meta.block_tables_SB[s, :nb]
                keys = kc[table].flatten(0, 1)[:cl].transpose(0, 1)[None]  # [1, K, L, D]
                vals = vc[table].flatten(0, 1)[:cl].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q.to(kc.dtype), keys, vals, attn_mask=mask,
                                                   scale=self.scale, enable_gqa=True)
            out_TND[start:start + ql] = o[0].transpose(0, 1).to(q_TND.dtype)
            start += ql
        return out_TND
