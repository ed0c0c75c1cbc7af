"""LLMEngine / LLM behaviour: stop rules, streaming deltas, n > 1, seeds, abort, and clear errors."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from ernie45.engine import LLM, LLMEngine, QueueFullError, SamplingParams
from tests.engine.conftest import CONFIGS, prompts

GREEDY = dict(temperature=0, ignore_eos=True)


class SPTokenizer:
    """The tokenizer surface the engine uses, over a real SentencePiece model (no detokenizer():
    the engine's own incremental decode is exercised). Ids past the model decode to nothing."""

    def __init__(self, path: str) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.eos_token_id = self.sp.eos_id()
        self.stop_token_ids = [self.eos_token_id]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.sp.decode([i for i in ids if 3 <= i < self.sp.get_piece_size()])


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory) -> SPTokenizer:
    words = ("river stone cloud lamp garden winter orange silver paper window music letter bridge forest "
             "candle mirror harbor meadow thunder velvet").split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] + ("," if j % 4 == 3 else "") for j in range(9)) + "."
             for i in range(300)]
    folder = tmp_path_factory.mktemp("sp")
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"),
                                   vocab_size=120, model_type="bpe", minloglevel=2)
    return SPTokenizer(str(folder / "sp.model"))


@pytest.fixture()
def llm(moe_model) -> LLM:
    return LLM(moe_model, kv_cache_memory="4MB", block_size=8)


P = prompts(CONFIGS["moe"].vocab_size, [9, 14, 6], seed=7)


def test_stop_strings_are_cut_across_token_boundaries_and_never_streamed(moe_model, sp_tokenizer):
    tok = sp_tokenizer
    llm = LLM(moe_model, tokenizer=tok, kv_cache_memory="4MB", block_size=8)
    prompt = tok.encode("river stone cloud")
    full = llm.generate([prompt], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    ids = full.token_ids
    # A stop string spanning the boundary between two tokens that both render text, late in the output.
    cut = next(i for i in range(len(ids) - 2, 4, -1)
               if len(tok.decode(ids[:i])) > len(tok.decode(ids[:i - 1])) + 1
               and len(tok.decode(ids[:i + 1])) > len(tok.decode(ids[:i])) + 1)
    left, right = tok.decode(ids[:cut]), tok.decode(ids[:cut + 1])
    stop = left[-2:] + right[len(left):len(left) + 2]
    assert stop in full.text
    expected = full.text[:full.text.find(stop)]
    params = SamplingParams(max_tokens=40, stop=["never-there", stop], **GREEDY)
    llm.engine.add_request("s", prompt, params)
    streamed, final = "", None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            streamed += out.outputs[0].delta_text
            assert stop not in out.outputs[0].text
            final = out
    got = final.outputs[0]
    assert got.text == expected == streamed
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert len(got.token_ids) < len(ids)


def test_streaming_deltas_add_up_and_max_tokens_gives_length(llm):
    llm.engine.add_request("a", P[0], SamplingParams(max_tokens=7, **GREEDY))
    ids, outs = [], []
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            ids += out.outputs[0].delta_token_ids
            outs.append(out)
    assert ids == outs[-1].outputs[0].token_ids and len(ids) == 7
    assert [o.finished for o in outs] == [False] * 6 + [True]
    assert outs[-1].outputs[0].finish_reason == "length"
    m = outs[-1].metrics
    assert m["arrival_time"] <= m["first_token_time"] <= m["finished_time"]


def test_stop_token_ids_and_eos(llm):
    base = llm.generate([P[1]], SamplingParams(max_tokens=20, **GREEDY))[0].outputs[0].token_ids
    k = next(i for i in range(3, 20) if base[i] not in base[:i])
    out = llm.generate([P[1]], SamplingParams(max_tokens=20, stop_token_ids=[base[k]], **GREEDY))[0].outputs[0]
    assert out.token_ids == base[:k + 1] and out.finish_reason == "stop" and out.stop_reason == base[k]
    # min_tokens suppresses the stop id: generation runs past it
    late = llm.generate([P[1]], SamplingParams(max_tokens=20, min_tokens=k + 1, stop_token_ids=[base[k]],
                                                **GREEDY))[0].outputs[0]
    assert len(late.token_ids) > k + 1 and late.token_ids[k] != base[k]
    llm.engine.eos_token_id = base[k]
    eos = llm.generate([P[1]], SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    assert eos.token_ids == base[:k + 1] and eos.finish_reason == "stop" and eos.stop_reason is None
    ignored = llm.generate([P[1]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == base


def test_max_model_len_ends_with_length(moe_model):
    llm = LLM(moe_model, kv_cache_memory="4MB", max_model_len=20)
    out = llm.generate([P[1]], SamplingParams(max_tokens=None, **GREEDY))[0]
    assert len(P[1]) + len(out.outputs[0].token_ids) == 20 and out.outputs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate([P[0]], p)[0].outputs[0].token_ids
    batch = llm.generate([P[1], P[0], P[2]], [SamplingParams(temperature=0.8, max_tokens=20), p,
                                               SamplingParams(temperature=1.0, seed=1, max_tokens=5)])
    assert batch[1].outputs[0].token_ids == alone
    other = llm.generate([P[0]], SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True))
    assert other[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_and_differ(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=12, ignore_eos=True, logprobs=2)
    out = llm.generate([P[1]], p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    seqs = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in seqs}) == 3 and all(len(s) == 12 for s in seqs)
    assert all(len(c.logprobs) == 12 and all(len(d) >= 2 for d in c.logprobs) for c in out.outputs)
    assert llm.engine.stats()["kv_blocks_used"] == 0
    assert llm.generate([P[1]], p)[0].outputs[1].token_ids == seqs[1]  # seeded per completion


def test_abort_frees_blocks_and_reports_abort(llm):
    eng = llm.engine
    eng.add_request("x", P[0], SamplingParams(max_tokens=50, **GREEDY))
    eng.add_request("y", P[1], SamplingParams(n=2, max_tokens=50, temperature=1.0))
    eng.step()
    eng.step()
    assert eng.stats()["kv_blocks_used"] > 0
    eng.abort("x")
    eng.abort("y")
    eng.abort("unknown")  # ignored
    outs = eng.step()
    assert {o.request_id for o in outs} == {"x", "y"}
    assert all(o.finished and all(c.finish_reason == "abort" for c in o.outputs) for o in outs)
    assert eng.stats()["kv_blocks_used"] == 0 and not eng.has_unfinished_requests()


def test_clear_errors(moe_model, llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("e", [])
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("t", "hello")
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("v", [1, CONFIGS["moe"].vocab_size])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request("s", [1, 2], SamplingParams(stop="x"))
    eng.add_request("d", [1, 2])
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request("d", [1, 2])
    small = LLMEngine(moe_model, kv_cache_memory=CONFIGS["moe"].kv_bytes_per_token(4) * 64, block_size=16)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        small.add_request("long", list(range(3, 80)))
    full = LLMEngine(moe_model, kv_cache_memory="1MB", max_waiting=1)
    full.add_request("a", [1, 2])
    with pytest.raises(QueueFullError):
        full.add_request("b", [1, 2])
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(moe_model, kv_cache_memory="1MB", max_model_len=10**6)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0.0),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0), ("min_tokens", -1),
    ("stop", [""]), ("stop_token_ids", [-1]), ("logprobs", -1), ("seed", "x"), ("temperature", float("nan")),
])
def test_sampling_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=3)


def test_public_names_are_re_exported():
    import ernie45

    assert ernie45.LLM is LLM and ernie45.LLMEngine is LLMEngine and ernie45.SamplingParams is SamplingParams
