"""/metrics is valid Prometheus text and its counters move with the work done."""

from __future__ import annotations

import re

import httpx

from tests.serve.util import SERVED_NAME, read_metrics, wait_idle

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (-?[0-9.e+-]+|\+Inf|NaN)$')


def test_metrics_text_format_and_histograms(server, client):
    before = read_metrics(server.url)
    res = client.completions.create(model=SERVED_NAME, prompt="hello world", max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = wait_idle(server.url)
    assert after["ernie45:generation_tokens_total"] - before["ernie45:generation_tokens_total"] == 5
    assert after["ernie45:prompt_tokens_total"] - before["ernie45:prompt_tokens_total"] == res.usage.prompt_tokens
    assert after["ernie45:request_success_total[length]"] == before.get("ernie45:request_success_total[length]",
                                                                        0) + 1
    assert after["ernie45:time_to_first_token_seconds_count"] == before["ernie45:time_to_first_token_seconds_count"] + 1
    assert after["ernie45:inter_token_latency_seconds_count"] - before["ernie45:inter_token_latency_seconds_count"] >= 4
    assert after["ernie45:kv_cache_blocks_total"] > 0

    text = httpx.get(server.url + "/metrics", timeout=10).text
    from ernie45 import kernels

    backend = "cpu" if kernels.available() else "torch"  # the server's engine runs "auto"
    assert f'ernie45:backend_info{{model_name="{SERVED_NAME}",backend="{backend}"}} 1' in text.splitlines()
    typed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    buckets: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name, labels, value = m.groups()
        assert f'model_name="{SERVED_NAME}"' in labels
        base = re.sub(r"_(bucket|sum|count)$", "", name) if typed.get(name) is None else name
        assert base in typed, f"{name} has no # TYPE line"
        if name.endswith("_bucket"):
            buckets.setdefault(base, []).append(float(value))
    assert set(buckets) == {"ernie45:time_to_first_token_seconds", "ernie45:inter_token_latency_seconds",
                            "ernie45:e2e_request_latency_seconds"}
    for base, counts in buckets.items():
        assert counts == sorted(counts), f"{base} buckets must be cumulative"
        assert counts[-1] == after[base + "_count"]
