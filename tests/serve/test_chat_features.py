"""Thinking and tool calls through the official `openai` client, streamed and not, on a scripted model:
the real server and engine, the logits replaced so the output is exactly a Thinking model's text."""

from __future__ import annotations

import json

import pytest

NAME = "scripted-thinking"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}]
REASONED = "Let me think about it.\nStep two.\n</think>\n\n<response>\nThe answer is 4.\n</response>\n"
CALLS = ("I need the tools.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"
         "\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n")


@pytest.fixture(scope="module")
def scripted(scripted_server):
    import openai

    srv, model, tok = scripted_server
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60), model, tok, srv


def run(scripted, text: str, messages: list[dict], tools=None, **kw):
    import httpx

    client, model, tok, srv = scripted
    rendered_tools = None if kw.get("tool_choice") == "none" else tools  # 'none' renders no tools
    # the server's own rendering (vLLM's /tokenize with messages), so the script starts right after it
    r = httpx.post(srv.url + "/tokenize", json={"messages": messages, "tools": rendered_tools}, timeout=30)
    model.prompt_len = r.json()["count"]
    model.script = tok.encode(text)
    base = {"model": NAME, "messages": messages, "temperature": 0, "max_tokens": 120, **kw}
    if tools is not None:
        base["tools"] = tools
    full = client.chat.completions.create(**base)
    reasoning, content, calls, reasons = "", "", {}, []
    for chunk in client.chat.completions.create(stream=True, **base):
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for tc in d.tool_calls or []:
                calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                calls[tc.index]["name"] += tc.function.name or ""
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return full, (reasoning, content, [calls[i] for i in sorted(calls)], reasons)


def test_reasoning_is_separated_streamed_and_not(scripted):
    _, _, tok, _ = scripted
    # </think> is a special token: the default detokenizer drops it, so the parser needs the raw text
    assert "</think>" not in tok.decode(tok.encode(REASONED))
    assert len(tok.encode("<response>")) > 1, "the <response> marker straddles chunks (several tokens)"
    full, (reasoning, content, calls, reasons) = run(scripted, REASONED, ASK)
    msg = full.choices[0].message
    assert msg.reasoning_content == "Let me think about it.\nStep two."
    assert msg.content == "The answer is 4."
    assert full.choices[0].finish_reason == "stop" and not msg.tool_calls
    assert (reasoning, content, calls, reasons) == (msg.reasoning_content, msg.content, [], ["stop"])


@pytest.mark.slow
def test_tool_calls_parsed_with_ids_streamed_and_not(scripted):
    full, (reasoning, content, calls, reasons) = run(scripted, CALLS, ASK, tools=TOOLS)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls"
    msg = choice.message
    assert msg.content is None and msg.reasoning_content == "I need the tools."
    got = [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
    assert got == [("get_weather", {"city": "Paris"}), ("now", {})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls)
    assert len({c.id for c in msg.tool_calls}) == 2
    assert reasons == ["tool_calls"] and reasoning == "I need the tools." and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == got
    assert all(c["id"].startswith("call_") for c in calls)
    # parallel_tool_calls=false keeps the first call only
    one, _ = run(scripted, CALLS, ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    # tool_choice none: the tools are not rendered, nothing is parsed as a call
    none, (_, streamed, scalls, _) = run(scripted, CALLS, ASK, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content
    assert streamed == none.choices[0].message.content and scalls == []


def test_history_with_tool_calls_and_tool_messages_is_rendered(scripted):
    client, model, tok, srv = scripted
    history = ASK + [
        {"role": "assistant", "content": None, "reasoning_content": "I need the tools.",
         "tool_calls": [{"id": "call_a", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21}"}]
    rendered = tok.apply_chat_template(
        [*history[:2], {**history[2], "tool_calls": [{"id": "call_a", "type": "function",
                                                      "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]},
         history[3]], tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_output>\n{\"temp\": 21}\n</tool_output>" in rendered
    full, _ = run(scripted, REASONED, history, tools=TOOLS)
    assert full.usage.prompt_tokens == len(tok.encode(rendered))
    assert full.choices[0].message.content == "The answer is 4."
    import httpx  # vLLM's /tokenize renders messages with the same template

    r = httpx.post(srv.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    assert r["tokens"] == tok.encode(rendered) and r["count"] == full.usage.prompt_tokens


def test_reasoning_budget_forces_the_closing_marker(scripted):
    _, _, tok, _ = scripted
    long_thought = "the quick brown fox jumps over the lazy dog " * 6
    script = tok.encode(long_thought)
    full, (reasoning, content, _, _) = run(scripted, long_thought, ASK, max_tokens=14,
                                           extra_body={"max_reasoning_tokens": 5})
    msg = full.choices[0].message
    assert msg.reasoning_content == tok.decode(script[:5]).strip()
    # token 5 was the forced </think>; the script goes on from token 6 and is now the answer
    assert msg.content == tok.decode(script[6:14]).strip()
    assert (reasoning, content) == (msg.reasoning_content, msg.content)
    vllm_name, _ = run(scripted, long_thought, ASK, max_tokens=14, extra_body={"thinking_token_budget": 5})
    assert vllm_name.choices[0].message.content == msg.content
    unbounded, _ = run(scripted, long_thought, ASK, max_tokens=14)
    assert unbounded.choices[0].message.content is None or unbounded.choices[0].message.content == ""
