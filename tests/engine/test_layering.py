"""The engine's seams: it runs the runner it is given, validates every request in one place (errors name
the field), and turns tokens into outputs in ``engine/output.py`` without a model."""

from __future__ import annotations

import pytest

from ernie45.engine import LLM, LLMEngine, RequestError, SamplingParams
from ernie45.engine.model_runner import ModelRunner
from ernie45.engine.output import OutputProcessor
from ernie45.engine.sequence import Sequence, SequenceStatus
from tests.engine.conftest import CONFIGS, prompts

GREEDY = dict(temperature=0, ignore_eos=True)


class CountingRunner(ModelRunner):
    """A runner handed to the engine: counts steps and sizes the cache for twice the layers (a stand-in for
    a runner whose process holds a different share of the model)."""

    steps = 0

    @classmethod
    def cache_config(cls, model):  # noqa: ANN001, ANN206
        return model.config.replace(num_hidden_layers=2 * model.config.num_hidden_layers)

    def execute(self, scheduled):  # noqa: ANN001, ANN201
        type(self).steps += 1
        return super().execute(scheduled)


def test_engine_runs_the_runner_it_is_given(moe_model):
    ids = prompts(CONFIGS["moe"].vocab_size, [5])[0]
    params = SamplingParams(max_tokens=4, **GREEDY)
    plain = LLM(moe_model, kv_cache_memory="1MB")
    want = plain.generate(ids, params)[0].outputs[0].token_ids
    llm = LLM(moe_model, kv_cache_memory="1MB", runner=CountingRunner)
    assert isinstance(llm.engine.runner, CountingRunner)
    assert llm.engine.kv_cache.num_blocks == plain.engine.kv_cache.num_blocks // 2  # sized by cache_config
    CountingRunner.steps = 0
    assert llm.generate(ids, params)[0].outputs[0].token_ids == want
    assert CountingRunner.steps == 4  # prefill + 3 decodes


def test_a_split_model_needs_the_multi_rank_runner(moe_model):
    moe_model.parallel_mesh = object()
    try:
        with pytest.raises(ValueError, match="runner=ernie45.parallel.runner.DistributedModelRunner"):
            LLMEngine(moe_model, kv_cache_memory="1MB")
    finally:
        del moe_model.parallel_mesh


@pytest.mark.parametrize("prompt,params,strict,param,code,words", [
    ([], {}, False, "prompt", None, "at least one token"),
    ([1, 10**6], {}, False, "prompt", None, "outside the vocabulary"),
    ([1, True], {}, False, "prompt", None, "integers"),
    (list(range(3, 35)), {}, False, "prompt", "context_length_exceeded", "shorten the prompt"),
    ([1, 2], {"max_tokens": 40}, True, "max_tokens", "context_length_exceeded", "lower max_tokens to at most 30"),
    ([1, 2], {"logprobs": 21}, False, "logprobs", None, "max_logprobs=20"),
    ([1, 2], {"stop": "x"}, False, "stop", None, "stop strings need a tokenizer"),
])
def test_request_errors_name_the_field(moe_model, prompt, params, strict, param, code, words):
    eng = LLMEngine(moe_model, kv_cache_memory="1MB", max_model_len=32, strict_max_tokens=strict)
    with pytest.raises(RequestError, match=words) as e:
        eng.add_request("r", prompt, SamplingParams(**params))
    assert (e.value.param, e.value.code) == (param, code)
    assert not eng.has_unfinished_requests()


def test_without_strict_max_tokens_a_long_request_ends_with_length(moe_model):
    llm = LLM(moe_model, kv_cache_memory="1MB", max_model_len=32)
    res = llm.generate([1, 2], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0]
    assert len(res.token_ids) == 30 and res.finish_reason == "length"


def test_sampling_params_errors_carry_the_field():
    with pytest.raises(RequestError) as e:
        SamplingParams(top_p=0.0)
    assert e.value.param == "top_p"


class CharTokenizer:
    """Token id i is the character chr(ord('a') + i); a detokenizer() that streams one char per token."""

    eos_token_id = 25

    def detokenizer(self, prompt_ids):  # noqa: ANN001, ANN201
        class D:
            def step(self, ids):  # noqa: ANN001, ANN202
                return "".join(chr(ord("a") + i) for i in ids)

        return D()


def _feed(proc: OutputProcessor, params: SamplingParams, tokens: list[int]):  # noqa: ANN202
    seq = Sequence("r", [0], params)
    out = proc.new_seq([0], params)
    deltas, finish = [], None
    for t in tokens:
        seq.append_token(t)
        finish = proc.append(seq, out, t, None)
        if finish:
            seq.status, seq.finish_reason, seq.stop_reason = SequenceStatus.FINISHED, *finish
        deltas.append(proc.completion(seq, out).delta_text)
        if finish:
            break
    return deltas, finish, proc.completion(seq, out)


def test_output_processor_cuts_stop_strings_across_tokens_and_holds_back():
    proc = OutputProcessor(CharTokenizer(), eos_token_id=25, max_model_len=100)
    params = SamplingParams(stop=["cde"], max_tokens=10)
    deltas, finish, final = _feed(proc, params, [0, 1, 2, 3, 4, 5])  # "abcdef": stop "cde" spans 3 tokens
    assert finish == ("stop", "cde")
    assert deltas == ["", "", "a", "b", ""] and final.text == "ab"  # 2 chars held back while "c", "cd" could start it
    deltas, finish, final = _feed(proc, SamplingParams(max_tokens=3), [7, 8, 9, 10])
    assert finish == ("length", None) and final.text == "hij" and final.token_ids == [7, 8, 9]
    _, finish, final = _feed(proc, SamplingParams(max_tokens=9, min_tokens=2), [25, 25, 1])
    assert finish == ("stop", None) and final.token_ids == [25, 25]  # EOS is ignored below min_tokens
