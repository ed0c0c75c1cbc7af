"""Structured output through the official `openai` client on the bundled demo model, which writes
nonsense unconstrained: JSON schema / json_object / regex / choice / grammar constraints, and tool calls
forced by tool_choice with their arguments constrained to the function's schema."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

NAME = "demo"
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
    "required": ["zone"], "additionalProperties": False}}}


def _serve(template: str | None):
    from ernie45.serve import ServerThread, build_app, build_engine

    engine = build_engine("demo", dtype="float32", kv_cache_memory="64MB", max_model_len=1024)
    if template is not None:
        engine.tokenizer.chat_template = template
    return ServerThread(build_app(engine, NAME))


@pytest.fixture(scope="module")
def demo():
    import openai

    with _serve(None) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def demo_tools():
    """The demo model behind the Thinking-style template of tests/data (it renders tools)."""
    import openai

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "ernie45_thinking_template.jinja")
    with open(path, encoding="utf-8") as f, _serve(f.read()) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=300)


@pytest.mark.slow
def test_50_of_50_schema_samples_parse_and_validate(demo):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}

    def batch(seed: int, constrained: bool) -> list[str]:
        kw = {"response_format": fmt} if constrained else {}
        res = demo.chat.completions.create(model=NAME, messages=ASK, n=10, temperature=1.0, seed=seed,
                                           max_tokens=80, **kw)
        return [c.message.content for c in res.choices]

    with ThreadPoolExecutor(5) as pool:  # 5 requests of n=10 at once: the mask is applied to a batch of 50
        texts = [t for ts in pool.map(lambda s: batch(s, True), range(5)) for t in ts]
    assert len(texts) == 50
    for t in texts:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(texts)) > 10, "temperature 1: the samples differ"
    free = batch(0, False)  # the same request unconstrained: the demo model does not write this JSON
    valid = 0
    for t in free:
        try:
            jsonschema.validate(json.loads(t), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0, free


def test_json_schema_streamed_equals_non_streamed(demo):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    kw = dict(model=NAME, messages=ASK, temperature=1.0, seed=3, max_tokens=80, response_format=fmt)
    full = demo.chat.completions.create(**kw).choices[0]
    jsonschema.validate(json.loads(full.message.content), SCHEMA)
    assert full.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in demo.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == full.message.content


def test_json_object_is_an_object(demo):
    """Any JSON object: the demo model's strings may run to max_tokens, but what it writes is an object
    (or, when cut, a prefix that llguidance's own JSON-object grammar accepts)."""
    import llguidance

    from ernie45.engine.structured import grammar_of, ll_tokenizer
    from ernie45.model.checkpoint import resolve_model_path
    from ernie45.tokenizer import load_tokenizer

    res = demo.chat.completions.create(model=NAME, messages=ASK, temperature=0.7, seed=0, max_tokens=30,
                                       response_format={"type": "json_object"}).choices[0]
    text = res.message.content
    assert text.startswith("{")
    if res.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    tok = load_tokenizer(resolve_model_path("demo"))
    m = llguidance.LLMatcher(ll_tokenizer(tok, 6144), grammar_of({"json_object": True}))
    assert m.consume_tokens(tok.encode(text)) and not m.is_error()
    bad = llguidance.LLMatcher(ll_tokenizer(tok, 6144), grammar_of({"json_object": True}))
    bad.consume_tokens(tok.encode("The river"))
    assert bad.is_error(), "the check itself refuses text that is not JSON"


@pytest.mark.parametrize("extra, check", [
    ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: __import__("re").fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"structured_outputs": {"choice": ["yes", "no way", "maybe"]}}, lambda t: t in ("yes", "no way", "maybe")),
    ({"guided_grammar": 'root ::= "A" ("b" | "c")* "."'}, lambda t: __import__("re").fullmatch(r"A[bc]*\.", t)),
    ({"structured_outputs": {"json": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}}},
     lambda t: all(isinstance(x, int) for x in json.loads(t))),
])
@pytest.mark.parametrize("stream", [False, True])
def test_completion_constraints(demo, extra, check, stream):
    kw = dict(model=NAME, prompt="The river", temperature=1.0, seed=5, max_tokens=40, extra_body=extra)
    if stream:
        text = "".join(c.choices[0].text for c in demo.completions.create(stream=True, **kw) if c.choices)
    else:
        text = demo.completions.create(**kw).choices[0].text
    assert check(text), text


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_follow_the_function_schema(demo_tools, stream):
    """tool_choice required / named on a model that cannot call tools: the grammar writes valid calls
    (after a thinking section closed by the budget)."""
    for choice, names in [("required", {"get_weather", "now"}),
                          ({"type": "function", "function": {"name": "now"}}, {"now"})]:
        for seed in range(3):
            # one call each (parallel_tool_calls=false): a nonsense model would otherwise chain calls to max_tokens
            kw = dict(model=NAME, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, CLOCK],
                      tool_choice=choice, temperature=1.0, seed=seed, max_tokens=120, parallel_tool_calls=False,
                      extra_body={"max_reasoning_tokens": 4})
            if stream:
                calls, reason = {}, None
                for chunk in demo_tools.chat.completions.create(stream=True, **kw):
                    for c in chunk.choices:
                        for tc in c.delta.tool_calls or []:
                            calls.setdefault(tc.index, ["", ""])
                            calls[tc.index][0] += tc.function.name or ""
                            calls[tc.index][1] += tc.function.arguments or ""
                        reason = c.finish_reason or reason
                got = [tuple(calls[i]) for i in sorted(calls)]
            else:
                c = demo_tools.chat.completions.create(**kw).choices[0]
                reason = c.finish_reason
                got = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
            assert reason == "tool_calls" and got, (choice, seed, got)
            schemas = {"get_weather": WEATHER, "now": CLOCK}
            for name, args in got:
                assert name in names
                jsonschema.validate(json.loads(args), schemas[name]["function"]["parameters"])
            assert len(got) == 1
