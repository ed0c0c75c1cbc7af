"""End-to-end greedy generation against transformers, batching invariance, prefix caching,
preemption and chunked prefill (all fp32, tiny informative models)."""

from __future__ import annotations

import pytest
import torch

from ernie45.engine import LLM, LLMEngine, SamplingParams
from tests.engine.conftest import CONFIGS, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def hf_greedy(ref, ids: list[int], n: int = 32) -> list[int]:  # noqa: ANN001
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_greedy_batch_matches_transformers_and_runs_alone_the_same(name, hf_checkpoints):
    ref, folder = hf_checkpoints[name]
    ps = prompts(CONFIGS[name].vocab_size, [5, 17, 33, 1], seed=1)
    llm = LLM(folder, dtype="float32", kv_cache_memory="8MB", block_size=8)
    batched = [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]
    expected = [hf_greedy(ref, p) for p in ps]
    for got, exp in zip(batched, expected):
        assert len(set(exp)) > 4, "reference output is (nearly) constant: the test could not fail"
        assert got == exp
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in ps[:2]]
    assert alone == batched[:2]


def test_prefix_caching_computes_fewer_tokens_and_gives_the_same_output(moe_model):
    vocab = CONFIGS["moe"].vocab_size
    shared, = prompts(vocab, [40], seed=2)
    tail_a, tail_b = prompts(vocab, [5, 7], seed=3)
    eng = LLMEngine(moe_model, kv_cache_memory="8MB", block_size=8)
    llm = LLM.__new__(LLM)
    llm.engine, llm._counter = eng, 0
    first = llm.generate([shared + tail_a], GREEDY)[0]
    computed_before = eng.stats()["prompt_tokens_computed"]
    second = llm.generate([shared + tail_b], GREEDY)[0]
    computed = eng.stats()["prompt_tokens_computed"] - computed_before
    assert second.num_cached_tokens == 40 and first.num_cached_tokens == 0
    assert computed == 7, "only the uncached tail runs through the model"
    cold = LLM(moe_model, kv_cache_memory="8MB", block_size=8, enable_prefix_caching=False)
    assert cold.generate([shared + tail_b], GREEDY)[0].outputs[0].token_ids == second.outputs[0].token_ids


def test_preemption_with_a_small_cache_gives_the_same_outputs(moe_model):
    ps = prompts(CONFIGS["moe"].vocab_size, [20, 25, 30, 18, 22, 27], seed=4)
    big = LLM(moe_model, kv_cache_memory="8MB", block_size=4)
    expected = [o.outputs[0].token_ids for o in big.generate(ps, GREEDY)]
    # 48 blocks x 4 = 192 tokens: six requests growing to ~60 tokens each cannot all stay resident.
    per_block = CONFIGS["moe"].kv_bytes_per_token(4) * 4
    small = LLM(moe_model, kv_cache_memory=48 * per_block, block_size=4)
    got = small.generate(ps, GREEDY)
    assert small.engine.stats()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in got] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    assert small.engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_gives_the_same_logits_as_unchunked(moe_model):
    p, = prompts(CONFIGS["moe"].vocab_size, [70], seed=5)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    whole = LLM(moe_model, kv_cache_memory="8MB", max_num_batched_tokens=512).generate([p], params)[0]
    chunked_llm = LLM(moe_model, kv_cache_memory="8MB", max_num_batched_tokens=16, block_size=8)
    chunked = chunked_llm.generate([p], params)[0]
    a, b = whole.outputs[0].logprobs[0], chunked.outputs[0].logprobs[0]
    assert list(a) == list(b)
    assert max(abs(a[t] - b[t]) for t in a) < 1e-4
    # and directly: the last-position logits equal the dense forward's
    with torch.no_grad():
        dense = moe_model(torch.tensor([p])).logits[0, -1].log_softmax(-1)
    assert max(abs(dense[t].item() - b[t]) for t in b) < 1e-4


@pytest.mark.slow
def test_long_context_32k_prompt_through_chunked_prefill():
    from ernie45.model.model import ErnieForCausalLM
    from tests.reference import scale_weights

    cfg = CONFIGS["dense"].replace(max_position_embeddings=40000, num_hidden_layers=1)
    torch.manual_seed(0)
    model = ErnieForCausalLM(cfg).eval()
    scale_weights(model, 0)
    n = 32768
    ids = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    budget = cfg.kv_bytes_per_token(4) * (n + 64)
    eng_llm = LLM(model, kv_cache_memory=budget, max_num_batched_tokens=2048, block_size=16)
    kv = eng_llm.engine.kv_cache
    assert sum(t.numel() * t.element_size() for t in kv.k + kv.v) <= budget
    out = eng_llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=3))[0]
    got = out.outputs[0].logprobs[0]
    with torch.no_grad():
        dense = model(torch.tensor([ids]), logits_indices=torch.tensor([n - 1])).logits[0].log_softmax(-1)
    assert out.outputs[0].token_ids == [int(dense.argmax())]
    assert max(abs(dense[t].item() - lp) for t, lp in got.items()) < 2e-3


def test_bf16_engine_matches_the_dense_bf16_forward(hf_checkpoints):
    from ernie45 import load_model

    model = load_model(hf_checkpoints["moe"][1], dtype=torch.bfloat16)
    ps = prompts(CONFIGS["moe"].vocab_size, [12, 30], seed=9)
    outs = LLM(model, kv_cache_memory="4MB", block_size=8).generate(
        ps, SamplingParams(temperature=0, max_tokens=1, logprobs=1))
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        for p, o in zip(ps, outs):
            dense = model(torch.tensor([p])).logits[0, -1].float().log_softmax(-1)
            tok = o.outputs[0].token_ids[0]
            assert dense[tok] >= dense.max() - 0.05   # the argmax, up to bf16 rounding of near-ties
            assert abs(o.outputs[0].logprobs[0][tok] - dense[tok].item()) < 0.05


def test_preempting_a_request_already_in_the_batch_gives_the_same_outputs(moe_model, monkeypatch):
    """The engine path to preempting a sequence already scheduled this step: an n=2 request's fork (its parent's
    arrival) computes its prompt tail after a newer request's decode is in the batch, on a cache that is full. The
    newer request is preempted out of the batch and recomputed later; every output equals a big cache's."""
    from ernie45.engine import scheduler as sched

    p, late = prompts(CONFIGS["moe"].vocab_size, [10, 3], seed=6)
    params = [SamplingParams(n=2, temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    big = LLM(moe_model, kv_cache_memory="8MB", block_size=4)
    expected = [[c.token_ids for c in o.outputs] for o in big.generate([p, late], params)]
    hits = []
    real = sched.Scheduler._preempt
    monkeypatch.setattr(sched.Scheduler, "_preempt",
                        lambda self, v, out, ids: hits.append(v.seq_id in ids) or real(self, v, out, ids))
    per_block = CONFIGS["moe"].kv_bytes_per_token(4) * 4
    small = LLM(moe_model, kv_cache_memory=4 * per_block, block_size=4)
    got = small.generate([p, late], params)
    assert small.engine.stats()["kv_blocks_total"] == 4
    assert any(hits), hits  # the branch under test ran: a victim already in the batch
    assert [[c.token_ids for c in o.outputs] for o in got] == expected
    assert small.engine.stats()["kv_blocks_used"] == 0
