"""The OpenAI routes through the official `openai` client against the real server and engine."""

from __future__ import annotations

import math

import pytest

from tests.serve.util import MAX_MODEL_LEN, SERVED_NAME

PROMPT = "the quick brown fox jumps over the lazy dog"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "hello world"}]


def stream_completion(client, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    """Assemble a streamed completion: texts and finish reasons per choice index, and the usage chunk."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def stream_chat(client, **kw) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    roles = set()
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert roles == set(texts), "every choice starts with an assistant role delta"
    return texts, reasons, usage


def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [SERVED_NAME]


def test_completion_stream_equals_non_stream_and_usage_is_exact(client, tokenizer):
    kw = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and len(full.choices) == 1
    assert full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    texts, reasons, usage = stream_completion(client, **kw)
    assert texts == {0: full.choices[0].text}
    assert reasons == {0: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 12)


def test_completion_with_token_id_prompt_matches_text_prompt(client, tokenizer):
    kw = dict(model=SERVED_NAME, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt=PROMPT, **kw)
    b = client.completions.create(prompt=tokenizer.encode(PROMPT), **kw)
    assert a.choices[0].text == b.choices[0].text


def test_chat_stream_equals_non_stream_and_usage_counts_the_template(client, tokenizer):
    kw = dict(model=SERVED_NAME, messages=MESSAGES, max_completion_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert full.usage.completion_tokens == 10
    texts, reasons, usage = stream_chat(client, **kw)
    assert texts == {0: full.choices[0].message.content}
    assert reasons == {0: full.choices[0].finish_reason}
    assert usage.prompt_tokens == full.usage.prompt_tokens and usage.completion_tokens == 10


def test_stop_string_cuts_the_text_and_reports_stop(client):
    kw = dict(model=SERVED_NAME, prompt="hello", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(max_tokens=24, **kw).choices[0].text
    assert len(full) >= 6, f"the tiny model's greedy text is too short to cut: {full!r}"
    stop = full[3:6]
    want = full[: full.index(stop)]
    got = client.completions.create(max_tokens=24, stop=[stop], **kw).choices[0]
    assert got.finish_reason == "stop"
    assert got.text == want
    texts, reasons, _ = stream_completion(client, max_tokens=24, stop=stop, **kw)
    assert texts == {0: want} and reasons == {0: "stop"}


def test_n2_gives_two_choices_and_sums_usage(client):
    kw = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1]
    assert full.usage.completion_tokens == 12
    texts, reasons, usage = stream_completion(client, **kw)
    assert texts == {c.index: c.text for c in full.choices}, "same seed, same texts whether streamed or not"
    assert reasons == {0: "length", 1: "length"} and usage.completion_tokens == 12
    chat = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, n=2, max_tokens=5, seed=3,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in chat.choices) == [0, 1] and chat.usage.completion_tokens == 10


def test_several_prompts_in_one_completion_request(client):
    kw = dict(model=SERVED_NAME, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    prompts = ["hello world", "the lazy dog"]
    both = client.completions.create(prompt=prompts, **kw)
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == alone
    assert both.usage.completion_tokens == 10


def test_completion_logprobs(client, tokenizer):
    res = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == res.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-5), "greedy picks the most likely token"
    assert sum(math.exp(v) for v in lp.top_logprobs[0].values()) <= 1.0 + 1e-4


def test_chat_logprobs(client):
    res = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = res.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob, abs_tol=1e-5)
        assert item.bytes == list(item.token.encode())


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_default_max_tokens_for_chat_runs_to_a_stop_or_the_context_end(client, tokenizer):
    res = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, temperature=0)
    n_prompt = len(tokenizer.encode_chat(MESSAGES))
    assert res.usage.prompt_tokens == n_prompt
    if res.choices[0].finish_reason == "length":
        assert res.usage.completion_tokens == MAX_MODEL_LEN - n_prompt
    else:
        assert res.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("route", ["/health", "/metrics", "/"])
def test_plain_routes(server, route):
    import httpx

    r = httpx.get(server.url + route, timeout=10)
    assert r.status_code == 200
    if route == "/metrics":
        assert "ernie45:num_requests_running" in r.text and "ernie45:time_to_first_token_seconds_bucket" in r.text
    if route == "/":
        assert "/v1/chat/completions" in r.text
