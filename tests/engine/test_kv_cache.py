"""Paged attention equals the dense causal path, for a mixed batch of decodes, a chunk with cached
context and a fresh prompt in one forward; KV sizing from a budget."""

from __future__ import annotations

import pytest
import torch

from ernie45.engine.block_manager import BlockManager
from ernie45.engine.kv_cache import KVCache, parse_budget, plan_num_blocks
from ernie45.engine.model_runner import ModelRunner
from ernie45.engine.scheduler import ScheduledSeq
from ernie45.engine.sequence import Sequence
from tests.engine.conftest import CONFIGS, prompts


def forward_step(model, kv, bm, work):  # noqa: ANN001
    """Compute ``num_new`` tokens of each (seq, num_new); returns the logits of every new token in the
    runner's order (decodes first) together with that order."""
    scheduled = [ScheduledSeq(s, n) for s, n in work]
    for sch in scheduled:
        bm.allocate(sch.seq, sch.seq.num_computed_tokens + sch.num_new_tokens)
    runner = ModelRunner(model, kv)
    input_ids, pos, meta, _, _ = runner.prepare(scheduled)
    with torch.no_grad():
        logits = model(input_ids, position_ids=pos[None], cache=runner.attention.step(meta)).logits[0]
    order = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
    rows, start = {}, 0
    for sch in order:
        rows[sch.seq.seq_id] = logits[start:start + sch.num_new_tokens]
        start += sch.num_new_tokens
        sch.seq.num_computed_tokens += sch.num_new_tokens
    return rows, order


@pytest.mark.parametrize("block_size", [4, 16])
def test_mixed_batch_equals_dense_causal(moe_model, block_size):
    cfg = CONFIGS["moe"]
    kv = KVCache(cfg, num_blocks=64, block_size=block_size, dtype=torch.float32)
    bm = BlockManager(64, block_size)
    a_ids, b_ids, c_ids, d_ids = prompts(cfg.vocab_size, [11, 12, 9, 5], seed=3)
    a, b, c, d = Sequence("a", a_ids), Sequence("b", b_ids), Sequence("c", c_ids), Sequence("d", d_ids)
    # Step 1: cache a's first 10 tokens, b's first 5 and d's first 4 (non-aligned to blocks).
    forward_step(moe_model, kv, bm, [(a, 10), (b, 5), (d, 4)])
    # Step 2: a decode (a), a chunk with cached context (b: 7 more), a fresh prompt (c), a decode (d).
    rows, order = forward_step(moe_model, kv, bm, [(b, 7), (a, 1), (c, 9), (d, 1)])
    assert [s.seq for s in order][:2] == [a, d]  # decodes are batched first
    with torch.no_grad():
        for seq, ids in ((a, a_ids), (b, b_ids[:12]), (c, c_ids), (d, d_ids)):
            dense = moe_model(torch.tensor([ids])).logits[0]
            got = rows[seq.seq_id]
            torch.testing.assert_close(got, dense[-got.shape[0]:], rtol=1e-4, atol=1e-4)
    assert dense.abs().max() > 1.0


def test_paged_attention_unit_equals_sdpa_reference():
    """The attend() hook alone, with random q/k/v and scattered (non-contiguous) block tables."""
    cfg = CONFIGS["dense"]
    bs, nh, kh, hd = 4, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kv = KVCache(cfg, num_blocks=32, block_size=bs, dtype=torch.float32, num_layers=1)
    g = torch.Generator().manual_seed(0)
    lens = [(1, 9), (6, 6), (3, 10)]  # (query_len, context_len): decode, fresh prefill, chunk
    tables = [[7, 3, 20], [5, 1], [30, 2, 9]]
    full_k = [torch.randn(c, kh, hd, generator=g) for _, c in lens]
    full_v = [torch.randn(c, kh, hd, generator=g) for _, c in lens]
    for (q, c), t, k, v in zip(lens, tables, full_k, full_v):  # pre-fill the cached context
        for p in range(c - q):
            kv.k[0][t[p // bs], p % bs], kv.v[0][t[p // bs], p % bs] = k[p], v[p]
    from ernie45.accel import AttentionMetadata, PagedAttention

    step = PagedAttention(kv).step(AttentionMetadata.build(tables, [q for q, _ in lens], [c for _, c in lens], bs))
    qs = [torch.randn(q, nh, hd, generator=g) for q, _ in lens]
    out = step.attend(0, torch.cat(qs), torch.cat([k[c - q:] for (q, c), k in zip(lens, full_k)]),
                    torch.cat([v[c - q:] for (q, c), v in zip(lens, full_v)]))
    start = 0
    for (q, c), qq, k, v in zip(lens, qs, full_k, full_v):
        rep = nh // kh
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qnd,knd->nqk", qq, kk) * hd**-0.5
        mask = torch.arange(c)[None] <= torch.arange(c - q, c)[:, None]
        ref = torch.einsum("nqk,knd->qnd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vv)
        torch.testing.assert_close(out[start:start + q], ref, rtol=1e-5, atol=1e-5)
        start += q


def test_kv_budget_sizing_uses_the_config_formula():
    cfg = CONFIGS["moe"]
    per_token = cfg.kv_bytes_per_token(4)
    assert plan_num_blocks(cfg, torch.float32, 16, per_token * 16 * 10 + 5) == 10
    kv = KVCache.from_budget(cfg, torch.float32, 16, "1MB")
    assert kv.num_blocks == 10**6 // (per_token * 16)
    assert sum(t.numel() * t.element_size() for t in kv.k + kv.v) <= 10**6
    assert parse_budget("2GB") == 2 * 10**9
    with pytest.raises(ValueError, match="kv_cache_memory"):
        parse_budget("lots")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        KVCache.from_budget(cfg, torch.float32, 16, 100)
