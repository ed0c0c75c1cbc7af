"""Paged attention over the engine's KV cache, straight from the block tables, in Triton.

One program per (query token, kv head) computes the ``N / K`` query heads that share the kv head (GQA) against
that sequence's cached keys with an online softmax in fp32, reading the cache blocks in place. A sequence may have
any number of query tokens in the step: query ``i`` of a sequence with ``q`` new tokens and ``c`` cached positions
after the step sits at position ``c - q + i`` and sees keys ``0 .. c - q + i`` — one decode token (``q = 1``), the
``k + 1`` positions of a speculative verification, or a prefill chunk over its cached prefix alike.

Cache layout (the engine's): ``[num_blocks, block_size, kv_heads, head_dim]`` per layer; ``block_tables [S, B]``
int32/int64; ``context_lens [S]`` (positions in the cache after this step's write, the new tokens included);
``query_start [S + 1]`` (cumulative query counts). Shape suffixes: T query tokens, N query heads, K kv heads,
D head_dim, S sequences.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, ctx_ptr, qstart_ptr, tok_seq_ptr,
                            scale, stride_qt, stride_qn, stride_kb, stride_ks, stride_kh, stride_tab,
                            stride_ot, stride_on, group_size,
                            BLOCK_SIZE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(tok_seq_ptr + t)
    q_first = tl.load(qstart_ptr + s)
    q_len = tl.load(qstart_ptr + s + 1) - q_first
    ctx = tl.load(ctx_ptr + s)
    pos = ctx - q_len + (t - q_first)                      # this query's position; it sees keys 0..pos
    offs_g = tl.arange(0, G)
    offs_d = tl.arange(0, D)
    head = kvh * group_size + offs_g
    g_ok = offs_g < group_size
    q = tl.load(q_ptr + t * stride_qt + head[:, None] * stride_qn + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    m_i = tl.full((G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G,), dtype=tl.float32)
    acc = tl.zeros((G, D), dtype=tl.float32)
    for start in range(0, pos + 1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n <= pos
        blk = tl.load(tables_ptr + s * stride_tab + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        row = blk * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale                                   # [G, BLOCK_N] fp32
        scores = tl.where(n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + t * stride_ot + head[:, None] * stride_on + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def token_sequences(query_start: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] int32: the sequence each query token belongs to (device ops only)."""
    ends = query_start[1:].to(torch.int64)
    tok = torch.arange(num_tokens, device=query_start.device)
    return torch.searchsorted(ends, tok, right=True).to(torch.int32)


def paged_attention(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start: torch.Tensor, scale: float,
                    tok_seq: torch.Tensor | None = None, block_n: int = 32) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys (written before the call). -> [T, N, D]."""
    t, n, d = q_TND.shape
    _, block_size, kv_heads, d_k = k_cache.shape
    if d_k != d or n % kv_heads or d & (d - 1):
        raise ValueError(f"paged_attention: q {tuple(q_TND.shape)} does not fit a cache of {kv_heads} kv heads x "
                         f"{d_k} (head_dim must match and be a power of two, heads a multiple of kv heads)")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_attention: the K and V caches must share one contiguous layout")
    group = n // kv_heads
    g_pad = max(16, triton.next_power_of_2(group))  # tl.dot needs at least 16 rows
    if tok_seq is None:
        tok_seq = token_sequences(query_start, t)
    out = torch.empty_like(q_TND)
    _paged_attention_kernel[(t, kv_heads)](
        q_TND, k_cache, v_cache, out, block_tables, context_lens, query_start, tok_seq, scale,
        q_TND.stride(0), q_TND.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), group,
        BLOCK_SIZE=block_size, G=g_pad, D=d, BLOCK_N=block_n)
    return out


def paged_attention_reference(q_TND: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: list[int], query_lens: list[int],
                              scale: float) -> torch.Tensor:
    """Plain torch, one sequence at a time, fp32: what :func:`paged_attention` must equal."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    n = q_TND.shape[1]
    outs, first = [], 0
    for s, (c, ql) in enumerate(zip(context_lens, query_lens)):
        pos = torch.arange(c, device=q_TND.device)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(n // kv_heads, dim=1)  # [C, N, D]
        v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(n // kv_heads, dim=1)
        q = q_TND[first:first + ql].float()
        scores = torch.einsum("qnd,cnd->nqc", q, k) * scale
        allowed = pos[None, :] <= torch.arange(c - ql, c, device=q.device)[:, None]       # [q, C]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        outs.append(torch.einsum("nqc,cnd->qnd", scores.softmax(-1), v))
        first += ql
    return torch.cat(outs).to(q_TND.dtype)
