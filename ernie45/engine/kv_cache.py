"""Paged KV cache: per-layer K/V tensors ``[num_blocks, block_size, kv_heads, head_dim]`` sized from a
memory budget, and the ``attend`` hook the model's attention calls on the cache path.

The batch is flattened: input_ids ``[1, T]`` holds every scheduled token of every sequence, decodes
first (one token each), then prefill chunks. ``AttentionMetadata`` (built once per step by the model
runner) says where each token's K/V go (``slot_mapping``) and which blocks each sequence reads.

Attention is plain torch (CPU and GPU): decodes are one batched SDPA over the keys gathered by block
table (GQA in the kernel, padding masked); each prefill chunk is one SDPA call (causal within the
chunk, full over its cached context). No Python work per token.

Shape suffixes: T tokens in the step, S sequences, B blocks per sequence, P block_size, L context
length, N query heads, K kv heads, D head_dim.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ernie45 import kernels
from ernie45.config import ModelConfig
from ernie45.model.checkpoint import parse_size
from ernie45.utils import advise_huge_pages, meminfo_bytes

log = logging.getLogger(__name__)

DEFAULT_RAM_FRACTION = 0.3
"""Share of MemAvailable (CPU) or of free GPU memory the cache takes when no budget is given."""


def parse_budget(kv_cache_memory: int | str) -> int:
    """``kv_cache_memory`` as bytes: an int, or a size string like "2GB" / "512MiB"."""
    try:
        n = parse_size(kv_cache_memory)
    except (ValueError, TypeError):
        raise ValueError(f"kv_cache_memory={kv_cache_memory!r}: give bytes or a size like '2GB', '512MB'") from None
    if n <= 0:
        raise ValueError(f"kv_cache_memory={kv_cache_memory!r} must be positive")
    return n


def available_memory(device: torch.device) -> int:
    """Free bytes now: MemAvailable from /proc/meminfo on CPU, cudaMemGetInfo on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = meminfo_bytes("MemAvailable")
    return free if free is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def plan_num_blocks(config: ModelConfig, dtype: torch.dtype, block_size: int, budget_bytes: int) -> int:
    """Blocks that fit in ``budget_bytes``, by the same formula the hardware planner uses."""
    per_block = config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size
    return budget_bytes // per_block


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to. Sequences are ordered decodes
    first; ``query_lens[i]`` tokens of sequence i are in the batch, ``context_lens[i]`` positions of
    it are in the cache after this step (its cached context plus the new tokens)."""

    slot_mapping_T: torch.Tensor          # [T] int64: block * block_size + offset of each new token
    query_lens: list[int]
    context_lens: list[int]
    block_tables_SB: torch.Tensor         # [S, B_max] int64, padded with 0 (masked out)
    num_decodes: int = 0
    """The first num_decodes sequences have query_len 1 and are batched together."""
    decode_mask: torch.Tensor | None = None   # [S_dec, 1, 1, L] bool: key position < context_len
    decode_lens: torch.Tensor | None = None   # [S_dec] int64 context lengths
    decode_tables: torch.Tensor | None = None  # [S_dec, B_dec] int64 block tables of the decodes, contiguous
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def build(cls, block_tables: list[list[int]], query_lens: list[int], context_lens: list[int],
              block_size: int, device: torch.device | str = "cpu") -> AttentionMetadata:
        """Build the step's tensors once (all layers share them). Decodes must come first."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
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
            meta.decode_lens = torch.tensor(context_lens[:num_decodes], dtype=torch.long, device=device)
            meta.decode_tables = meta.block_tables_SB[:num_decodes, :width_d].contiguous()
            meta.decode_mask = (torch.arange(width_d * block_size, device=device)[None]
                                < meta.decode_lens[:, None])[:, None, None]
        for q, c in zip(query_lens[num_decodes:], context_lens[num_decodes:]):
            if q == c:
                meta.prefill_masks.append(None)  # no cached context: plain causal
            else:  # query i sits at position c - q + i and sees keys 0..c-q+i
                rows = torch.arange(c - q, c, device=device)[:, None]
                meta.prefill_masks.append(torch.arange(c, device=device)[None] <= rows)  # [q, c]
        return meta


class KVCache:
    """The per-layer K/V tensors and the paged ``attend`` hook for ``ErnieForCausalLM``."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", num_layers: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget holds {num_blocks} blocks of {block_size} tokens; "
                             f"give a larger kv_cache_memory")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.scale = config.head_dim ** -0.5
        layers = num_layers if num_layers is not None else config.num_hidden_layers
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        advise_huge_pages(self.k + self.v)  # decode attention streams the cache: 2 MiB pages, before the first write
        for t in self.k + self.v:
            t.zero_()
        self._ptrs = ([t.data_ptr() for t in self.k], [t.data_ptr() for t in self.v])  # for the native layers
        self.meta: AttentionMetadata | None = None
        log.info("KV cache: %d blocks x %d tokens, %.1f MiB", num_blocks, block_size,
                 2 * layers * self.k[0].numel() * self.k[0].element_size() / 2**20)

    @classmethod
    def from_budget(cls, config: ModelConfig, dtype: torch.dtype, block_size: int,
                    kv_cache_memory: int | str | None = None, device: torch.device | str = "cpu",
                    max_tokens: int | None = None, extra_layers: int = 0) -> KVCache:
        """Size the cache from ``kv_cache_memory`` (bytes or "2GB"), or by default from a fraction of
        free memory, capped at ``max_tokens`` (what the engine can ever use at once). ``extra_layers`` slots
        beyond the decoder's (the MTP block's, for speculative decoding) share the budget."""
        device = torch.device(device)
        if kv_cache_memory is None:
            budget = int(available_memory(device) * DEFAULT_RAM_FRACTION)
            if max_tokens is not None:
                budget = min(budget, config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
                             * (max_tokens + block_size))
        else:
            budget = parse_budget(kv_cache_memory)
        layers = config.num_hidden_layers
        num_blocks = plan_num_blocks(config, dtype, block_size, budget * layers // (layers + extra_layers))
        return cls(config, num_blocks, block_size, dtype, device, num_layers=layers + extra_layers)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _decode_attention(self, q_SND: torch.Tensor, keys_SKLD: torch.Tensor, vals_SKLD: torch.Tensor,
                          mask_S1L: torch.Tensor) -> torch.Tensor:
        """One query per sequence over its cached keys, in fp32 (as SDPA accumulates): two batched matmuls and
        a softmax. For a single query this is several times faster on CPU than SDPA's masked GQA path
        (~260 us a layer at the 21B shape), and the same math. Query head h reads kv head h // (N / K)."""
        s, n, d = q_SND.shape
        k = keys_SKLD.shape[1]
        q = q_SND.float().view(s, k, n // k, d)                                           # [S, K, G, D]
        scores = torch.matmul(q, keys_SKLD.float().transpose(-1, -2)) * self.scale        # [S, K, G, L]
        scores = scores.masked_fill(~mask_S1L[:, :, None], float("-inf"))
        return torch.matmul(scores.softmax(-1), vals_SKLD.float()).view(s, n, d)          # [S, N, D]

    def decode_step(self, num_tokens: int) -> kernels.DecodeStep | None:
        """This step's cache arguments for the native decode layers (``model.native``) when the step is decode only
        (``num_tokens`` sequences, one token each) on bf16 CPU caches; else None (the layers then call
        :meth:`attend`)."""
        meta = self.meta
        kc = self.k[0]
        if (meta is None or meta.num_decodes != num_tokens or len(meta.query_lens) != num_tokens
                or kc.dtype != torch.bfloat16 or kc.device.type != "cpu" or not kernels.available()):
            return None
        return kernels.DecodeStep(meta.slot_mapping_T, meta.decode_tables, meta.decode_lens, self.capacity_tokens,
                                  self.block_size, *self._ptrs)

    def attend(self, layer_idx: int, q_TND: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
               ) -> torch.Tensor:
        """Write this step's k/v at the slot mapping, then attend each sequence over its cache."""
        meta = self.meta
        assert meta is not None, "KVCache.attend() outside a step (meta is not set)"
        kc, vc = self.k[layer_idx], self.v[layer_idx]              # [NB, P, K, D]
        if k_TKD.dtype == kc.dtype == torch.bfloat16 and kc.device.type == "cpu" and kernels.available():
            kernels.kv_write(k_TKD, v_TKD, kc, vc, meta.slot_mapping_T)  # one call, no dispatcher round trips
        else:
            kflat, vflat = kc.view(-1, self.num_kv_heads, self.head_dim), vc.view(-1, self.num_kv_heads, self.head_dim)
            kflat.index_copy_(0, meta.slot_mapping_T, k_TKD.to(kc.dtype))
            vflat.index_copy_(0, meta.slot_mapping_T, v_TKD.to(vc.dtype))
        sd = meta.num_decodes
        native = sd > 0 and kernels.decode_attention_ok(q_TND, kc)  # reads the cache in place (no gathered copy)
        if native and sd == q_TND.shape[0]:  # a decode-only step: the kernel's output is the whole result
            return kernels.decode_attention(q_TND, kc, vc, meta.decode_tables, meta.decode_lens, self.scale,
                                            q_TND.dtype)
        out_TND = torch.empty_like(q_TND)
        if sd:
            if native:
                o = kernels.decode_attention(q_TND[:sd], kc, vc, meta.decode_tables, meta.decode_lens, self.scale)
                out_TND[:sd] = o.to(q_TND.dtype)
            else:
                keys = kc[meta.decode_tables].flatten(1, 2).transpose(1, 2)     # [S, K, L, D]
                vals = vc[meta.decode_tables].flatten(1, 2).transpose(1, 2)
                out_TND[:sd] = self._decode_attention(q_TND[:sd], keys, vals,
                                                      meta.decode_mask[:, 0]).to(q_TND.dtype)
        start = sd
        for i, mask in enumerate(meta.prefill_masks):
            s = sd + i
            ql, cl = meta.query_lens[s], meta.context_lens[s]
            q = q_TND[start:start + ql].transpose(0, 1)[None]      # [1, N, q, D]
            if mask is None:  # the whole context is this chunk: attend to the new k/v as they are
                keys = k_TKD[start:start + ql].transpose(0, 1)[None].to(q.dtype)
                vals = v_TKD[start:start + ql].transpose(0, 1)[None].to(q.dtype)
                o = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, scale=self.scale,
                                                   enable_gqa=True)
            else:
                nb = -(-cl // self.block_size)
                table = meta.block_tables_SB[s, :nb]
                keys = kc[table].flatten(0, 1)[:cl].transpose(0, 1)[None]  # [1, K, L, D]
                vals = vc[table].flatten(0, 1)[:cl].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q.to(kc.dtype), keys, vals, attn_mask=mask,
                                                   scale=self.scale, enable_gqa=True)
            out_TND[start:start + ql] = o[0].transpose(0, 1).to(q_TND.dtype)
            start += ql
        return out_TND
