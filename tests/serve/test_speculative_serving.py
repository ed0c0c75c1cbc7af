"""The server with speculative decoding (`ernie45 serve demo --speculative-tokens K --speculative-adaptive`): the
same completions as without it (fp32), and the drafting counters and the adaptive gauges on /metrics."""

from __future__ import annotations

import openai

from ernie45.serve import ServerThread, build_app, build_engine
from tests.serve.util import wait_idle


def _complete(engine) -> tuple[list[str], dict[str, float]]:  # noqa: ANN001 - an LLMEngine
    with ServerThread(build_app(engine, "demo")) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        texts = [c.completions.create(model="demo", prompt=p, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
                 for p in ("Fortune favours", "The wise man")]
        return texts, wait_idle(srv.url)


def test_speculative_adaptive_server_gives_the_plain_completions():
    opts = {"dtype": "float32", "kv_cache_memory": "64MB", "max_num_seqs": 4}
    plain, _ = _complete(build_engine("demo", **opts))
    spec, m = _complete(build_engine("demo", speculative_tokens=2, speculative_adaptive=True, **opts))
    assert spec == plain and all(plain)
    assert m["ernie45:spec_decode_num_draft_tokens_total"] > 0
    assert 0 < m["ernie45:spec_decode_num_accepted_tokens_total"] <= m["ernie45:spec_decode_num_draft_tokens_total"]
    # two requests of 6 tokens, at most 14 steps: inside the controller's first window (16 steps), which drafts
    assert m["ernie45:spec_decode_drafting"] == 1 and m["ernie45:spec_decode_plain_steps_total"] == 0
    assert 2 <= m["ernie45:spec_decode_drafting_steps_total"] <= 14
