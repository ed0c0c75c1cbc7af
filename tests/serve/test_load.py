"""Bounded load test: 64 concurrent streaming clients against the real server and engine.

Every completed request must equal the same request run alone (greedy), no response may be a 5xx, the
clients that hang up early must be aborted, and afterwards the engine holds no request and no KV block.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.serve.util import SERVED_NAME, read_metrics, wait_idle

CONCURRENCY = 64
N_REQUESTS = 160
DISCONNECT_EVERY = 7  # request i with i % 7 == 3 reads two events, then hangs up
PROMPTS = ["hello world", "the quick brown fox", "python code for a tensor batch", "a lazy dog",
           "streaming server request", "expert layer attention cache", "question and answer", "memory"]
MAX_TOKENS = [3, 8, 16, 24]


def request_body(i: int) -> tuple[str, dict]:
    """The i-th request: chat or completion, greedy, prompt and length cycling through small tables."""
    prompt, max_tokens = PROMPTS[i % len(PROMPTS)], MAX_TOKENS[(i // len(PROMPTS)) % len(MAX_TOKENS)]
    common = {"model": SERVED_NAME, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": i % 2 == 0}
    if i % 3 == 0:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": prompt}


def text_of(route: str, choice: dict, streamed: bool) -> str:
    if route == "/v1/completions":
        return choice["text"]
    return (choice.get("delta") or {}).get("content") or "" if streamed else choice["message"]["content"]


async def run_one(client: httpx.AsyncClient, url: str, i: int, disconnect: bool) -> dict:
    route, body = request_body(i)
    if disconnect:
        body = {**body, "max_tokens": 200, "ignore_eos": True}  # long enough to still run when we hang up
    text, finish, events, done = "", None, 0, False
    async with client.stream("POST", url + route, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return {"i": i, "status": r.status_code, "body": (await r.aread()).decode()}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            assert "error" not in ev, ev
            events += 1
            for c in ev["choices"]:
                text += text_of(route, c, streamed=True)
                finish = c.get("finish_reason") or finish
            if disconnect and events == 2:
                return {"i": i, "status": 200, "disconnected": True}
    return {"i": i, "status": 200, "text": text, "finish": finish, "done": done}


async def load(url: str) -> list[dict]:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY + 8, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker(i: int) -> dict:
            async with sem:
                return await run_one(client, url, i, disconnect=i % DISCONNECT_EVERY == 3)

        return await asyncio.gather(*(worker(i) for i in range(N_REQUESTS)))


def test_64_concurrent_streaming_clients(server):
    # references: each distinct request run alone, not streamed
    refs = {}
    with httpx.Client(timeout=60) as c:
        for i in range(N_REQUESTS):
            route, body = request_body(i)
            key = json.dumps([route, body], sort_keys=True)
            if i % DISCONNECT_EVERY == 3 or key in refs:
                continue
            r = c.post(server.url + route, json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            refs[key] = (text_of(route, choice, streamed=False), choice["finish_reason"])
    aborted_before = read_metrics(server.url).get("ernie45:request_success_total[abort]", 0)

    results = asyncio.run(load(server.url))

    assert [r for r in results if r["status"] != 200] == [], "no request may fail under load"
    n_disconnected = 0
    for r in results:
        if r.get("disconnected"):
            n_disconnected += 1
            continue
        route, body = request_body(r["i"])
        assert r["done"], f"request {r['i']} ended without data: [DONE]"
        assert (r["text"], r["finish"]) == refs[json.dumps([route, body], sort_keys=True)], \
            f"request {r['i']} differs from the same request run alone"
    assert n_disconnected == len([i for i in range(N_REQUESTS) if i % DISCONNECT_EVERY == 3])

    m = wait_idle(server.url)
    assert m["ernie45:num_requests_running"] == 0 and m["ernie45:num_requests_waiting"] == 0
    assert m["ernie45:kv_cache_blocks_used"] == 0, "every KV block is back in the pool"
    assert m["ernie45:request_success_total[abort]"] - aborted_before == n_disconnected
