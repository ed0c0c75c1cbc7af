"""Bad input gets OpenAI-style error JSON with the right 4xx status, and the server keeps serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ernie45.serve import ServerThread, build_app, build_engine
from tests.serve.util import MAX_MODEL_LEN, SERVED_NAME, engine_kwargs, read_metrics, wait_idle

CHAT = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
COMP = {"model": SERVED_NAME, "prompt": "hello", "max_tokens": 4}
LONG_PROMPT = list(range(3, 3 + MAX_MODEL_LEN))  # token ids: exactly the context, no room to generate

CASES = [  # (route, body (dict, or raw bytes), status, words the message must contain, param)
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object", None),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-5"}, 404, "'gpt-5' does not exist", "model"),
    ("/v1/completions", {**COMP, "model": "nope"}, 404, "does not exist", "model"),
    ("/v1/chat/completions", {"model": SERVED_NAME}, 400, "messages: Field required", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": "hello"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "role", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {**COMP, "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    # issue 15: fields the server knows but does not implement are refused by name, never ignored
    ("/v1/completions", {**COMP, "suffix": "end"}, 400, "suffix", "suffix"),
    ("/v1/completions", {**COMP, "best_of": 3}, 400, "best_of", "best_of"),
    ("/v1/completions", {**COMP, "use_beam_search": True}, 400, "beam search", "use_beam_search"),
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy"}}, 400, "audio", "audio"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, 400, "modalities", "modalities"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "send 'tools'", "functions"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, 400, "reasoning_effort", "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "store": True}, 400, "store", "store"),
    ("/v1/chat/completions", {**CHAT, "prediction": {"type": "content", "content": "x"}}, 400, "prediction",
     "prediction"),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"continuous_usage_stats": True}}, 400,
     "continuous_usage_stats", "stream_options"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "does not render tools", "tools"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tools", "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format",
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400, "schema",
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a"}, 400,
     "more than one output constraint", "response_format"),
    ("/v1/completions", {**COMP, "guided_regex": "(unclosed"}, 400, "constraint", None),
    ("/v1/completions", {**COMP, "logit_bias": {"x": 1}}, 400, "logit_bias", "logit_bias"),
    ("/v1/completions", {**COMP, "logit_bias": {"5": 500}}, 400, "logit_bias", "logit_bias"),
    ("/v1/completions", {**COMP, "logit_bias": {"99999999": 5}}, 400, "outside the vocabulary", None),
    ("/v1/chat/completions", {**CHAT, "max_reasoning_tokens": 8}, 400, "thinking template",
     "max_reasoning_tokens"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role", "messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, 400, "exactly one", "prompt"),
    ("/v1/completions", {**COMP, "max_tokens": 10**9}, 400, "maximum context length", "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**6}, 400, "lower max_tokens", "max_tokens"),
    ("/v1/completions", {**COMP, "prompt": LONG_PROMPT}, 400, "maximum context length", "prompt"),
    ("/v1/completions", {**COMP, "prompt": "fox " * (4 * MAX_MODEL_LEN)}, 400, "shorten the prompt", "prompt"),
    ("/v1/completions", {**COMP, "prompt": [10**7]}, 400, "outside the vocabulary", "prompt"),
    ("/v1/completions", {**COMP, "prompt": ""}, 400, "at least one token", "prompt"),
    ("/v1/completions", {"model": SERVED_NAME}, 400, "prompt: Field required", "prompt"),
    ("/v1/completions", {**COMP, "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {**COMP, "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {**COMP, "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {**COMP, "n": 0}, 400, "SamplingParams.n=0", "n"),
    ("/v1/completions", {**COMP, "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {**COMP, "stop": 5}, 400, "stop", "stop"),
    ("/v1/completions", {**COMP, "logprobs": 99}, 400, "logprobs", "logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": -1}, 400, "top_logprobs", "top_logprobs"),
    ("/v1/completions", {**COMP, "prompt": "x" * 70_000}, 413, "--max-body-bytes", None),
]


@pytest.mark.parametrize("route,body,status,words,param", CASES,
                         ids=[f"{i}-{c[2]}-{c[3][:20]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_a_readable_4xx(server, route, body, status, words, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + route, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param, err
    if param is not None:
        assert err["param"] == param


def test_unknown_route_and_method_are_json_errors(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_server_keeps_serving_after_errors(server, client):
    for route, body, *_ in CASES:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(server.url + route, content=content, timeout=30)
    res = client.completions.create(model=SERVED_NAME, prompt="hello", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert res.usage.completion_tokens == 3
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    m = wait_idle(server.url)
    assert m["ernie45:kv_cache_blocks_used"] == 0 and m["ernie45:num_requests_running"] == 0


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    body = {**COMP, "max_tokens": MAX_MODEL_LEN - 8, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep the iterator alive: dropping it would close the connection now
        events = 0
        for line in lines:
            events += line.startswith("data:")
            if events == 3:
                break
        busy = read_metrics(server.url)
        assert busy["ernie45:kv_cache_blocks_used"] > 0, {k: v for k, v in busy.items() if "bucket" not in k}
    # leaving the block closed the connection mid-stream
    m = wait_idle(server.url)
    assert (m["ernie45:num_requests_running"], m["ernie45:kv_cache_blocks_used"]) == (0, 0)
    assert m.get("ernie45:request_success_total[abort]", 0) >= 1


def test_full_waiting_queue_gets_429(tiny_checkpoint):
    engine = build_engine(tiny_checkpoint, **engine_kwargs(max_num_seqs=1, max_waiting=1))
    long = {**COMP, "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True}
    with ServerThread(build_app(engine, SERVED_NAME)) as srv, httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/completions", json={**long, "stream": True}) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # now it runs
            waiting = threading.Thread(target=lambda: c.post(srv.url + "/v1/completions", json={**COMP}))
            waiting.start()
            deadline = time.monotonic() + 10
            while read_metrics(srv.url)["ernie45:num_requests_waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.02)
            r = c.post(srv.url + "/v1/completions", json=COMP)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error" and "max_waiting" in r.json()["error"]["message"]
        waiting.join(30)
        assert not waiting.is_alive()
        assert read_metrics(srv.url)["ernie45:request_rejected_total[429]"] == 1
        assert c.post(srv.url + "/v1/completions", json=COMP).status_code == 200  # serving again


def test_cli_serve_with_api_key(tiny_checkpoint):
    """`ernie45 serve` as users run it: binds loopback, /v1 needs the key, /health does not."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
    proc = subprocess.Popen([sys.executable, "-m", "ernie45.cli", "serve", tiny_checkpoint, "--port", str(port),
                             "--api-key", "s3cret", "--served-model-name", "keyed", "--dtype", "float32",
                             "--kv-cache-memory", "16MB", "--max-model-len", str(MAX_MODEL_LEN)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.get(url + "/v1/models", timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**COMP, "model": "keyed"},
                       headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["keyed"]
        res = client.completions.create(model="keyed", prompt="hello", max_tokens=2, extra_body={"ignore_eos": True})
        assert res.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(30)
