"""Speculative decoding with the MTP block: exact verification (greedy token-identical, sampled
distribution-identical), drafting, acceptance metrics, and the engine features around it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ernie45 import ModelConfig
from ernie45.engine import speculative
from ernie45.engine.llm import LLMEngine
from ernie45.engine.sampler import SeqSampling, make_generator
from ernie45.engine.sampling_params import SamplingParams
from ernie45.engine.sequence import Sequence
from ernie45.model.model import ErnieForCausalLM, init_weights
from tests.engine.conftest import prompts

CFG = ModelConfig.from_name("tiny-moe").replace(tie_word_embeddings=False, num_nextn_predict_layers=1)


def mtp_model(seed: int = 0, std: float = 0.08) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    return init_weights(ErnieForCausalLM(CFG), std=std, seed=seed).eval()


def run(model, token_prompts, params, k, **kw) -> tuple[list[list[int]], LLMEngine]:  # noqa: ANN001
    eng = LLMEngine(model, kv_cache_memory=kw.pop("kv", "4MB"), speculative_tokens=k, **kw)
    for i, p in enumerate(token_prompts):
        eng.add_request(str(i), p, params)
    final = {}
    steps = 0
    while eng.has_unfinished_requests():
        steps += 1
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    eng.steps = steps
    return [final[str(i)].outputs[0].token_ids for i in range(len(token_prompts))], eng


# ------------------------------------------------------------------------------------------ verification math
class _FakeSeq:
    def __init__(self, params: SamplingParams, seed: int) -> None:
        self.params = params
        self.token_ids = [5, 6]
        self.num_prompt_tokens = 2
        self.output_token_ids: list[int] = []
        self.num_output_tokens = 0
        self.state = type("S", (), {})()
        self.state.sampling = SeqSampling(make_generator(seed, 0), [])


def _first_token_frequencies(p_logits, q_probs, draft_token_fn, n, residual=None):  # noqa: ANN001
    v = p_logits.shape[-1]
    counts = torch.zeros(v)
    params = SamplingParams(temperature=1.0, max_tokens=4)
    for i in range(n):
        seq = _FakeSeq(params, seed=i)
        d = int(torch.multinomial(q_probs, 1, generator=seq.state.sampling.generator))
        draft = speculative.Draft([d, draft_token_fn(d)], torch.stack([q_probs, q_probs]))
        _, toks = speculative.verify(p_logits, seq, draft)
        counts[toks[0]] += 1
    return counts / n


@pytest.mark.slow
def test_sampled_output_distribution_equals_the_target(monkeypatch):
    """The first emitted token is distributed as the target's p whatever the draft distribution q; the test's
    total-variation bound fails a verifier that resamples from p instead of the residual max(0, p - q)."""
    p_logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    q = torch.tensor([0.05, 0.6, 0.05, 0.1, 0.2])  # very unlike p[0]
    p0 = p_logits[0].softmax(-1)
    n = 2000
    freq = _first_token_frequencies(p_logits, q, lambda d: (d + 1) % 5, n)
    tv = 0.5 * (freq - p0).abs().sum().item()
    assert tv < 0.07, (freq, p0)  # expected ~0.026 at 2000 draws; the wrong residual below gives 0.164

    monkeypatch.setattr(speculative, "residual", lambda p, q: p)  # the classic bug: resample from p
    bad = _first_token_frequencies(p_logits, q, lambda d: (d + 1) % 5, n)
    assert 0.5 * (bad - p0).abs().sum().item() > 0.11


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    seq = _FakeSeq(SamplingParams(temperature=0.0), seed=0)
    logits = torch.full((4, 8), -1.0)
    for j, best in enumerate([3, 5, 1, 7]):
        logits[j, best] = 2.0
    assert speculative.verify(logits, seq, speculative.Draft([3, 5, 1], None)) == (3, [3, 5, 1, 7])
    assert speculative.verify(logits, seq, speculative.Draft([3, 4, 1], None)) == (1, [3, 5])
    assert speculative.verify(logits, seq, speculative.Draft([0, 5, 1], None)) == (0, [3])
    with pytest.raises(ValueError, match="4 rows"):
        speculative.verify(logits[:3], seq, speculative.Draft([3, 5, 1], None))


def test_penalties_see_the_accepted_drafts():
    """A repetition penalty at position j counts drafts d_<j as output: the target there is what plain decoding
    would have computed after emitting them."""
    params = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    seq = _FakeSeq(params, seed=0)
    logits = torch.zeros(2, 6)
    logits[:, 4] = 3.0  # token 4 is best at both positions ...
    logits[:, 2] = 2.0
    # ... but after emitting 4 once the penalty (2.0) makes 2 the argmax at position 1
    assert speculative.verify(logits, seq, speculative.Draft([4], None)) == (1, [4, 2])


# ------------------------------------------------------------------------------------------ the engine
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_is_token_identical(k):
    model = mtp_model(seed=1)
    ps = prompts(CFG.vocab_size, [5, 17, 9, 33], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain, _ = run(model, ps, params, 0)
    spec, eng = run(model, ps, params, k)
    assert spec == plain
    st = eng.stats()
    assert st["spec_verify_steps"] > 0 and st["spec_draft_tokens"] > 0
    assert 0 <= st["spec_acceptance_rate"] <= 1


def test_chunked_prefill_prefix_cache_and_preemption_keep_it_exact():
    """Small token budget (prompts split into chunks), a shared prefix served from the cache, and a KV cache so
    small that sequences are preempted and recomputed mid-generation."""
    model = mtp_model(seed=3)
    base = prompts(CFG.vocab_size, [40], seed=4)[0]
    ps = [base + [7, 8, 9], base + [10, 11], prompts(CFG.vocab_size, [23], seed=5)[0], base]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    plain, _ = run(model, ps, params, 0, kv="4MB", max_num_batched_tokens=16, block_size=4, max_model_len=80)
    tiny_kv = 96 * CFG.kv_bytes_per_token(4) * 4 // 3  # 24 blocks of 4 tokens (3 layers + the MTP slot)
    spec, eng = run(model, ps, params, 3, kv=tiny_kv, max_num_batched_tokens=16, block_size=4, max_model_len=80)
    assert eng.kv_cache.num_blocks == 24
    assert spec == plain
    st = eng.stats()
    assert st["num_preemptions"] > 0 and st["prefix_cache_hit_tokens"] > 0 and st["spec_verify_steps"] > 0


def _forced(agree: bool) -> ErnieForCausalLM:
    """Decoder layers and the MTP block add nothing (zero output projections), so the target's next token is a
    function of the current token only; the MTP projection passes the next token's embedding (agree) or its
    negation (disagree) through, so its draft is the target's own prediction or never it."""
    model = mtp_model(seed=6, std=0.3)
    m = model.model
    with torch.no_grad():
        for layer in list(m.layers) + list(m.mtp_block):
            layer.self_attn.o_proj.weight.zero_()
            if layer.is_moe:
                layer.mlp.experts.down_proj.zero_()
                if layer.mlp.shared_experts is not None:
                    layer.mlp.shared_experts.down_proj.weight.zero_()
            else:
                layer.mlp.down_proj.weight.zero_()
        h = CFG.hidden_size
        proj = torch.zeros(h, 2 * h)
        proj[:, :h] = torch.eye(h) * (1.0 if agree else -1.0)
        m.mtp_linear_proj[0].weight.copy_(proj)
    return model


@pytest.mark.parametrize("agree", [True, False])
def test_forced_agreement_and_disagreement(agree):
    model = _forced(agree)
    ps = prompts(CFG.vocab_size, [6, 11], seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    plain, e0 = run(model, ps, params, 0)
    spec, e3 = run(model, ps, params, 3)
    assert spec == plain
    st = e3.stats()
    if agree:
        assert st["spec_acceptance_rate"] > 0.95
        assert e3.steps < e0.steps / 2  # ~4 tokens a step
    else:
        assert st["spec_acceptance_rate"] == 0
        assert e3.steps <= e0.steps  # one token a step, as without drafts: the cost stays bounded


def test_sampling_fields_keep_their_meaning():
    """Seeds reproduce, n > 1 gives independent streams, stop strings/ids and max_tokens end where they should,
    logprobs come for every emitted token (raw model distribution, equal to the plain path's)."""
    model = mtp_model(seed=8)
    ps = prompts(CFG.vocab_size, [9], seed=9)
    p = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=123, ignore_eos=True, n=2)
    a, _ = run(model, ps, p, 2)
    b, _ = run(model, ps, p, 2)
    assert a == b

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    eng0 = LLMEngine(model, kv_cache_memory="4MB")
    eng2 = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=2)
    outs = []
    for eng in (eng0, eng2):
        eng.add_request("r", ps[0], greedy)
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs.append(o.outputs[0])
    assert outs[0].token_ids == outs[1].token_ids and len(outs[1].logprobs) == 12
    for lp0, lp1 in zip(outs[0].logprobs, outs[1].logprobs):
        assert lp0.keys() == lp1.keys()
        assert all(abs(lp0[t] - lp1[t]) < 1e-4 for t in lp0)

    stop_tok = outs[0].token_ids[5]
    first = outs[0].token_ids.index(stop_tok)
    s_params = dataclasses.replace(greedy, logprobs=None, stop_token_ids=[stop_tok])
    got, _ = run(model, ps, s_params, 3)
    assert got[0] == outs[0].token_ids[:first + 1]


def test_bad_settings_are_clear_errors():
    plain = init_weights(ErnieForCausalLM(CFG.replace(num_nextn_predict_layers=0)), seed=0)
    with pytest.raises(ValueError, match="MTP block"):
        LLMEngine(plain, kv_cache_memory="1MB", speculative_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        LLMEngine(mtp_model(), kv_cache_memory="1MB", speculative_tokens=-1)


def test_block_manager_trim_releases_only_uncommitted_tail():
    from ernie45.engine.block_manager import BlockManager
    bm = BlockManager(8, 4)
    seq = Sequence("r", list(range(9)))
    bm.allocate(seq, 9 + 4)  # 9 tokens + 4 lookahead positions: 4 blocks
    seq.num_computed_tokens = 8
    bm.commit(seq)  # two full blocks hashed
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    bm.trim(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5


def _reference_drafts(model, tokens: list[int], k: int) -> list[int]:  # noqa: ANN001
    """Greedy drafts computed densely, without the engine: the main model over the sequence, the MTP block over
    every (h_t, x_{t+1}) pair (causal), then k - 1 recursive applications appended to that row."""
    with torch.no_grad():
        x = torch.tensor([tokens])
        h = model(x[:, :-1]).hidden_states                                # h_0 .. h_{N-2}
        hs, ids = [h], [x[:, 1:]]
        drafts = []
        for _ in range(k):
            hh, ii = torch.cat(hs, 1), torch.cat(ids, 1)
            out = model.mtp_hidden(hh, ii, torch.arange(hh.shape[1])[None])[:, -1:]
            d = int(model.lm_head(out)[0, -1].argmax())
            drafts.append(d)
            hs.append(out)
            ids.append(torch.tensor([[d]]))
    return drafts


def test_batched_drafting_equals_each_sequence_drafted_alone(monkeypatch):
    """The engine drafts all sequences of a step together (one MTP forward per depth, some sequences stopping
    early at their max_tokens): every draft equals the one computed densely for that sequence alone."""
    model = mtp_model(seed=11)
    eng = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=3, block_size=4)
    seen: list[tuple[list[int], list[int]]] = []
    propose = eng._propose

    def recording(kept, batch):  # noqa: ANN001, ANN202
        propose(kept, batch)
        for seq in eng.scheduler.running:
            if seq.draft is not None:
                seen.append((list(seq.token_ids), list(seq.draft.tokens)))

    monkeypatch.setattr(eng, "_propose", recording)
    for i, (p, n) in enumerate(zip(prompts(CFG.vocab_size, [7, 19, 12], seed=12), [9, 14, 20])):
        eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert len(seen) > 10 and {len(d) for _, d in seen} >= {1, 2, 3}  # budgets cut near max_tokens
    for tokens, drafts in seen:
        assert drafts == _reference_drafts(model, tokens, len(drafts)), tokens


def test_quantized_draft_block_keeps_the_output_exact():
    """speculative_draft_quant quantizes only the MTP block (its layer and input projection): the drafts change a
    little (the forced-agreement head, whose weights int8 holds exactly, still agrees), the output not at all, and the
    main model's weights are untouched."""
    from ernie45.quant.modules import QuantLinear
    model = _forced(agree=True)
    main_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mtp_" not in n}
    ps = prompts(CFG.vocab_size, [8, 15], seed=14)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain, _ = run(model, ps, params, 0)
    spec, eng = run(model, ps, params, 3, speculative_draft_quant="int8")
    assert spec == plain
    m = model.model
    assert isinstance(m.mtp_block[0].self_attn.q_proj, QuantLinear) and isinstance(m.mtp_linear_proj[0], QuantLinear)
    assert not isinstance(m.layers[0].self_attn.q_proj, QuantLinear)
    for n, p in model.named_parameters():
        if n in main_before:
            assert torch.equal(p, main_before[n]), n
    assert eng.stats()["spec_acceptance_rate"] > 0.95
    with pytest.raises(ValueError, match="speculative_draft_quant"):
        LLMEngine(mtp_model(), kv_cache_memory="1MB", speculative_tokens=2, speculative_draft_quant="int5")
    with pytest.raises(ValueError, match="speculative_tokens > 0"):
        LLMEngine(mtp_model(), kv_cache_memory="1MB", speculative_draft_quant="int8")


def test_sequences_with_smaller_draft_budgets_next_to_larger_ones():
    """Sequences near their max_tokens draft fewer tokens than the others of the step, and their blocks cover only
    their own drafts: the later drafting depths' positions must not be looked up for them (an IndexError in
    ``draft_positions`` before), and the output stays that of plain decoding."""
    model = mtp_model(seed=15)
    ps = prompts(CFG.vocab_size, [3, 4, 5, 6, 7, 8, 9, 10], seed=16)
    outs = {}
    for k in (0, 4):
        eng = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=k, block_size=2)
        for i, p in enumerate(ps):
            for n in range(2, 12):
                eng.add_request(f"{i}-{n}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        final = {}
        while eng.has_unfinished_requests():
            final.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
        outs[k] = final
    assert len(outs[0]) == 80 and outs[4] == outs[0]


def _fuzz_case(seed: int) -> tuple[dict, list[tuple[int, list[int], SamplingParams]], dict[str, int]]:
    """Engine settings, a schedule of requests (step to add it at, prompt, params) and of aborts (request id ->
    step), drawn from ``seed``."""
    import random
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8, 16])
    opts = {"block_size": bs, "max_num_batched_tokens": rng.choice([8, 16, 64, 2048]), "max_model_len": 64,
            "kv": rng.choice([96, 160, 4000]) * CFG.kv_bytes_per_token(4) * 4 // 3}  # 3 layers + the MTP slot
    base = prompts(CFG.vocab_size, [rng.randint(4, 24)], seed=seed)[0]
    reqs = []
    for i in range(rng.randint(3, 9)):
        p = prompts(CFG.vocab_size, [rng.randint(1, 20)], seed=1000 * seed + i)[0]
        if rng.random() < 0.4:
            p = base + p[:rng.randint(0, 6)]  # a shared prefix, served from the cache
        max_tokens = rng.randint(1, 24)
        sampled = rng.random() < 0.3  # seeded sampling: its tokens differ from plain decoding's, its limits do not
        ignore_eos = rng.random() < 0.7
        min_tokens = min(max_tokens, rng.choice([0, 0, 3]))
        stop_ids = rng.sample(range(CFG.vocab_size), 3) if rng.random() < 0.4 else None
        params = SamplingParams(
            temperature=0.8 if sampled else 0.0, seed=seed * 100 + i if sampled else None, max_tokens=max_tokens,
            ignore_eos=ignore_eos, min_tokens=min_tokens, stop_token_ids=stop_ids,
            repetition_penalty=rng.choice([1.0, 1.0, 1.3]), presence_penalty=rng.choice([0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, 0.3]), n=rng.choice([1, 1, 2]))
        reqs.append((rng.choice([0, 0, 1, 3, 7]), p, params))
    aborts = {str(i): rng.randint(1, 12) for i in range(len(reqs)) if rng.random() < 0.15}  # request -> step
    return opts, reqs, aborts


class _Flipper(speculative.DraftController):
    """An adaptive engine's controller that switches drafting on and off at random steps."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        import random
        self.rng = random.Random(seed)
        self.on = True

    drafting = property(lambda self: self.on)

    def mode(self, batch: int) -> bool:
        return self.on

    def record(self, tokens: int, secs: float, batch: int = 1) -> None:
        self.steps[self.on] += 1
        if self.rng.random() < 0.3:
            self.on = not self.on


def _fuzz_run(model, opts: dict, reqs: list, k: int, aborts: dict[str, int],  # noqa: ANN001
              flip: int | None = None) -> dict:
    opts = dict(opts)
    eng = LLMEngine(model, kv_cache_memory=opts.pop("kv"), speculative_tokens=k,
                    speculative_adaptive=flip is not None, **opts)
    if flip is not None:
        eng.draft_controller = _Flipper(flip)
    final, step = {}, 0
    while step <= max(s for s, _, _ in reqs) or eng.has_unfinished_requests():
        for i, (at, p, params) in enumerate(reqs):
            if at == step:
                eng.add_request(str(i), p, params)
        for rid, at in aborts.items():
            if at == step:
                eng.abort(rid)
        step += 1
        for out in eng.step():
            if out.finished:
                final[out.request_id] = [(o.token_ids, o.finish_reason) for o in out.outputs]
    assert eng.block_manager.num_free_blocks == eng.kv_cache.num_blocks  # every block back
    return final


@pytest.mark.parametrize("seed", range(8))
def test_random_schedules_match_plain_decoding(seed):
    """Random engine settings (block size, token budget, a KV cache small enough to preempt, prefix sharing) and
    requests (lengths, max_tokens from 1, min_tokens, stop ids, penalties, n = 2, staggered arrival, some sampled,
    some aborted):
    plain decoding gives each greedy request what it gets alone; each k (and an adaptive engine whose drafting goes
    on and off at random steps, deferring and catching up the MTP pairs) gives the greedy requests the tokens and
    finish reasons of plain decoding, the sampled ones their limits (length, min_tokens, stop ids), and every block
    is returned."""
    model = mtp_model(seed=20 + seed)
    opts, reqs, aborts = _fuzz_case(seed)
    plain = _fuzz_run(model, opts, reqs, 0, aborts)
    assert len(plain) == len(reqs)
    alone = {"kv": "4MB", "block_size": 16, "max_num_batched_tokens": 2048, "max_model_len": 64}
    for i, (_, p, params) in enumerate(reqs):  # the batched engine against each greedy request run alone
        if params.temperature == 0 and str(i) not in aborts:
            assert _fuzz_run(model, alone, [(0, p, params)], 0, {})["0"] == plain[str(i)], (i, opts)
    for k, flip in ((1, None), (2, None), (4, None), (2, seed)):  # the last: drafting switched on and off at random
        spec = _fuzz_run(model, opts, reqs, k, aborts, flip)
        assert spec.keys() == plain.keys()
        for i, (_, _, params) in enumerate(reqs):
            if "abort" in {r for _, r in spec[str(i)]} | {r for _, r in plain[str(i)]}:
                continue  # where an abort lands depends on how many tokens a step made: the blocks are checked
            if params.temperature == 0:
                assert spec[str(i)] == plain[str(i)], (k, i, opts)
                continue
            for tokens, reason in spec[str(i)]:  # sampled: the limits hold
                stops = set(params.stop_token_ids or []) | (set() if params.ignore_eos else {CFG.eos_token_id})
                assert params.min_tokens <= len(tokens) <= params.max_tokens, (k, i)
                assert not stops & set(tokens[:-1]), (k, i)  # a stop id only as the last token
                if reason == "stop":
                    assert tokens[-1] in stops, (k, i)
                else:
                    assert reason == "length" and len(tokens) == params.max_tokens, (k, i, reason)


# ------------------------------------------------------------------------------------------ speculative_adaptive
def test_draft_controller_keeps_the_faster_mode_and_re_tries_the_other():
    c = speculative.DraftController(window=4, explore=3)
    st = c.state(1)

    def window(tok_s: float, batch: int = 1) -> None:
        for _ in range(4):
            c.record(int(tok_s), 1.0, batch)

    assert c.drafting and c.mode(1)
    window(50)  # drafting 50 tok/s; plain never measured: try it
    assert not c.drafting and st.rate[True] == 50
    window(100)  # plain faster: keep it
    assert not c.drafting and st.rate[False] == 100
    window(90)  # the mean of plain's last two windows, 95, still beats 50
    assert not c.drafting and st.rate[False] == 95 and st.age[True] == 2
    window(100)  # drafting's measure is three windows old: re-tried
    assert c.drafting
    window(200)  # now drafting is faster (its old 50 replaced, not averaged): kept
    assert c.drafting and st.rate[True] == 200
    window(200)
    assert c.drafting
    assert c.steps == {True: 12, False: 12} and c.switches == 2
    window(200)  # plain three windows old: re-tried
    assert not c.drafting
    window(100)  # and it lost: back to drafting, and plain waits twice as long (6 windows) before the next try
    assert c.drafting and st.wait[False] == 6
    for _ in range(5):
        window(200)
        assert c.drafting
    window(200)
    assert not c.drafting  # the sixth window: re-tried
    window(100)
    assert c.drafting and st.wait[False] == 12
    window(200)
    assert st.wait[True] == 3  # drafting's re-try had won: its wait stays at explore
    # another batch size decides on its own measurements: 8-15 sequences start drafting, whatever batch 1 does
    assert [c.bucket(b) for b in (1, 2, 3, 4, 7, 8, 15, 16)] == [1, 2, 2, 3, 3, 4, 4, 5]
    assert c.mode(8) and c.state(12) is c.state(8) and c.state(8) is not st
    window(300, batch=8)
    window(900, batch=9)  # plain, tried, is 3x faster at this size
    window(900, batch=8)
    assert not c.mode(8) and not c.drafting and c.mode(1)
    with pytest.raises(ValueError, match="window"):
        speculative.DraftController(window=0)
    with pytest.raises(ValueError, match="max_wait"):
        speculative.DraftController(explore=8, max_wait=4)


def _mtp_kv(eng: LLMEngine, seq: Sequence, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP block's cached keys and values at positions 0 .. n - 1 of ``seq``."""
    layer, bs = len(eng.kv_cache.k) - 1, eng.kv_cache.block_size
    slots = [seq.block_table[t // bs] * bs + t % bs for t in range(n)]
    k = eng.kv_cache.k[layer].flatten(0, 1)[slots]
    v = eng.kv_cache.v[layer].flatten(0, 1)[slots]
    return k, v


class _Scripted(speculative.DraftController):
    """Drafting off for the first ``off`` steps, then on."""

    def __init__(self, off: int) -> None:
        super().__init__()
        self.off = off
        self.on = off <= 0

    drafting = property(lambda self: self.on)

    def mode(self, batch: int) -> bool:
        return self.on

    def record(self, tokens: int, secs: float, batch: int = 1) -> None:
        self.steps[self.on] += 1
        self.on = sum(self.steps.values()) >= self.off


def test_deferred_mtp_pairs_fill_the_cache_drafting_every_step_fills(monkeypatch):
    """Not drafting, a sequence's MTP pairs wait (up to MTP_DEFER_MAX, then run together); when drafting resumes
    they run before the draft. The block's cache then holds what an engine drafting every step wrote there."""
    import ernie45.engine.llm as llm_mod
    monkeypatch.setattr(llm_mod, "MTP_DEFER_MAX", 5)
    model = mtp_model(seed=3)
    p = prompts(CFG.vocab_size, [9], seed=4)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    ref = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=2)
    eng = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=2, speculative_adaptive=True)
    eng.draft_controller = _Scripted(off=13)
    ref.add_request("a", p, params)
    eng.add_request("a", p, params)
    seq, rseq = eng.scheduler.waiting[0], ref.scheduler.waiting[0]
    seen = []
    while eng.draft_controller.steps[True] < 1:  # the plain steps, then the first drafting one
        eng.step()
        seen.append(0 if seq.mtp_pending is None else seq.mtp_pending[2])
    assert max(seen) == 4 and 0 in seen[2:12]  # pairs waited, at most 4, and ran at 5
    assert seq.mtp_pending is None and seq.draft is not None  # caught up, drafted
    n = seq.num_tokens - 1  # every pair so far: positions 0 .. num_tokens - 2
    while rseq.num_tokens - 1 < n:
        ref.step()
    assert rseq.token_ids[:n + 1] == seq.token_ids[:n + 1]
    for a, b in zip(_mtp_kv(eng, seq, n), _mtp_kv(ref, rseq, n)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drafting_pays", [False, True])
def test_adaptive_engine_keeps_the_faster_mode(drafting_pays):
    """A clock on which drafting steps are slow (or fast): the engine ends up plain (or drafting) for most steps,
    with output identical to plain decoding, and its stats say so."""
    model = _forced(True)  # acceptance ~1: ~4 tokens a drafting step
    ps = prompts(CFG.vocab_size, [6, 11], seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    plain, _ = run(model, ps, params, 0)
    eng = LLMEngine(model, kv_cache_memory="4MB", speculative_tokens=3, speculative_adaptive=True)
    eng.draft_controller = speculative.DraftController(window=4, explore=4)
    now = [0.0]

    def clock() -> float:  # each step's two reads: a drafting step takes 10 (or 1) units, a plain one 2
        now[0] += (5.0 if not drafting_pays else 0.5) if eng.draft_controller.drafting else 1.0
        return now[0]

    eng._clock = clock
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, params)
    final = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.outputs[0].token_ids
    assert [final[str(i)] for i in range(len(ps))] == plain
    st = eng.stats()
    assert st["spec_mode_switches"] >= 1 and st["spec_tok_s_drafting"] and st["spec_tok_s_plain"]
    from ernie45.serve.metrics import ServerMetrics

    text = ServerMetrics("m").render(st)
    for name, value in [("spec_decode_num_draft_tokens_total", st["spec_draft_tokens"]),
                        ("spec_decode_num_accepted_tokens_total", st["spec_accepted_tokens"]),
                        ("spec_decode_num_verifications_total", st["spec_verify_steps"]),
                        ("spec_decode_drafting", int(st["spec_drafting"])),
                        ("spec_decode_drafting_steps_total", st["spec_steps_drafting"]),
                        ("spec_decode_plain_steps_total", st["spec_steps_plain"])]:
        assert f'ernie45:{name}{{model_name="m"}} {value}' in text.splitlines(), name
    if drafting_pays:
        assert st["spec_steps_drafting"] > 2 * st["spec_steps_plain"]
    else:
        assert st["spec_steps_plain"] > 2 * st["spec_steps_drafting"]
    with pytest.raises(ValueError, match="speculative_tokens > 0"):
        LLMEngine(model, kv_cache_memory="4MB", speculative_adaptive=True)
