"""/v1/completions as evaluation harnesses use it (echo + logprobs, max_tokens 0, vLLM's prompt_logprobs),
logit_bias, vLLM's /tokenize /detokenize /tokenizer_info, and unknown fields passing, through the real
server and the official `openai` client. Prompt log-probabilities are checked against scoring the same
tokens with `load_model` directly (fp32 log_softmax of the reference forward)."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.serve.util import SERVED_NAME

PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def direct(tiny_checkpoint):
    """log p(token_i | tokens_<i) from the model itself, no server, no engine."""
    import ernie45

    model = ernie45.load_model(tiny_checkpoint, dtype=torch.float32).eval()

    def score(ids: list[int]) -> tuple[list[float], list[int]]:
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))], logp[:-1].argmax(-1).tolist()

    return score


@pytest.mark.parametrize("stream", [False, True])
def test_echo_logprobs_equal_direct_scoring(client, tokenizer, direct, stream):
    ids = tokenizer.encode(PROMPT)
    want, greedy = direct(ids)
    kw = dict(model=SERVED_NAME, prompt=[ids, ids[:5]], echo=True, logprobs=1, max_tokens=0, temperature=0)
    if stream:
        choices = {}
        for chunk in client.completions.create(stream=True, **kw):
            for c in chunk.choices:
                choices[c.index] = c
        choices = [choices[i] for i in sorted(choices)]
    else:
        res = client.completions.create(**kw)
        choices = sorted(res.choices, key=lambda c: c.index)
        assert res.usage.completion_tokens == 0 and res.usage.prompt_tokens == len(ids) + 5
    lp = choices[0].logprobs
    assert choices[0].text == tokenizer.decode(ids, skip_special_tokens=False)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == choices[0].text
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    for i in range(1, len(ids)):  # the top-1 alternative is the argmax; the token itself is listed too
        top = lp.top_logprobs[i]
        assert lp.tokens[i] in top and max(top.values()) >= lp.token_logprobs[i] - 1e-6
        assert (abs(max(top.values()) - lp.token_logprobs[i]) < 1e-6) == (greedy[i - 1] == ids[i])
    assert choices[1].logprobs.token_logprobs[1:] == pytest.approx(want[:4], abs=1e-4)
    assert [c.finish_reason for c in choices] == ["length", "length"]


def test_echo_with_generation_like_lm_eval(client, tokenizer, direct):
    """lm-eval's local-completions payload: token ids, echo, logprobs=1, max_tokens=1."""
    ids = tokenizer.encode(PROMPT)
    want, _ = direct(ids)
    res = client.completions.create(model=SERVED_NAME, prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                    temperature=0, seed=1234, extra_body={"ignore_eos": True})
    c = res.choices[0]
    assert len(c.logprobs.token_logprobs) == len(ids) + 1  # the prompt, then the one generated token
    assert c.logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
    gen = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=1, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    assert c.text == tokenizer.decode(ids, skip_special_tokens=False) + gen
    assert c.logprobs.text_offset[len(ids)] == len(tokenizer.decode(ids, skip_special_tokens=False))
    # a text prompt echoes the text as sent
    t = client.completions.create(model=SERVED_NAME, prompt=PROMPT, echo=True, max_tokens=2, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    assert t.startswith(PROMPT) and len(t) > len(PROMPT)


def test_vllm_prompt_logprobs(client, tokenizer, direct):
    ids = tokenizer.encode(PROMPT)
    want, _ = direct(ids)
    res = client.completions.create(model=SERVED_NAME, prompt=ids, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2, "ignore_eos": True})
    pl = res.choices[0].model_extra["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(ids)
    for i in range(1, len(ids)):
        entry = pl[i][str(ids[i])]
        assert abs(entry["logprob"] - want[i - 1]) < 1e-4 and entry["rank"] >= 1
        assert {1, 2} <= {v["rank"] for v in pl[i].values()}  # the top-2 alternatives are listed
    assert res.choices[0].text == client.completions.create(
        model=SERVED_NAME, prompt=ids, max_tokens=1, temperature=0, extra_body={"ignore_eos": True}).choices[0].text


def test_logit_bias_forces_and_bans(client, tokenizer):
    kw = dict(model=SERVED_NAME, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    forced = tokenizer.encode("fox")[0]
    res = client.completions.create(logit_bias={str(forced): 100}, logprobs=0, **kw)
    assert res.choices[0].logprobs.tokens == [tokenizer.decode([forced])] * 6
    plain = client.completions.create(logprobs=0, **kw).choices[0]
    first = tokenizer.encode(plain.logprobs.tokens[0])[0]
    banned = client.completions.create(logit_bias={str(first): -100}, logprobs=0, **kw).choices[0]
    assert banned.logprobs.tokens[0] != plain.logprobs.tokens[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        stream=True, logit_bias={str(forced): 100}, **kw) if c.choices)
    assert streamed == res.choices[0].text


def test_tokenize_detokenize_tokenizer_info(server, tokenizer):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}, timeout=30).json()
    assert r["tokens"] == tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    assert "".join(r["token_strs"]) == PROMPT and r["max_model_len"] > 0
    msgs = [{"role": "user", "content": "hello"}]
    r = httpx.post(server.url + "/tokenize", json={"messages": msgs}, timeout=30).json()
    assert r["tokens"] == tokenizer.encode_chat(msgs)
    d = httpx.post(server.url + "/detokenize", json={"tokens": tokenizer.encode(PROMPT)}, timeout=30).json()
    assert d == {"prompt": PROMPT}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**8]}, timeout=30)
    assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "</s>" and "chat_template" in info


def test_unknown_fields_pass_but_known_ones_are_never_ignored(server):
    body = {"model": SERVED_NAME, "prompt": "hello", "max_tokens": 2, "some_future_field": {"x": 1},
            "user": "u1", "prompt_cache_key": "k", "store": False, "service_tier": "auto"}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=30).status_code == 200
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "modalities": ["text"], "safety_identifier": "s", "unknown_thing": 1}
    assert httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=30).status_code == 200
