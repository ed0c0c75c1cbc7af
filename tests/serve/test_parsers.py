"""The reasoning / tool-call parser on its own: every way of cutting the text into stream chunks gives the
same message as parsing it whole, markers cut in two included."""

from __future__ import annotations

import pytest

from ernie45.serve.reasoning import ChatOutputParser, message_fields

CASES = [  # (text, thinking prompt, tools offered, expected message without ids)
    ("Let me think.\nOK.\n</think>\n\n<response>\nHello world!\n</response>\n", True, False,
     {"content": "Hello world!", "reasoning_content": "Let me think.\nOK."}),
    ("Need tools.\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, 2]}}\n</tool_call>\n"
     "<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>\n", True, True,
     {"content": None, "reasoning_content": "Need tools.",
      "tool_calls": [("f", '{"x": [1, 2]}'), ("g", "{}")]}),
    ("Cut short by max_tokens", True, False, {"content": "", "reasoning_content": "Cut short by max_tokens"}),
    ("x\n</think>\n<tool_call>\n{not json}\n</tool_call>", True, True,
     {"content": "<tool_call>\n{not json}\n</tool_call>", "reasoning_content": "x"}),
    ("x\n</think>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}", True, True,  # stopped before the close tag
     {"content": None, "reasoning_content": "x", "tool_calls": [("f", "{}")]}),
    ("<think>inner</think>Plain <b>answer</b> \n", False, True,
     {"content": "Plain <b>answer</b>", "reasoning_content": "inner"}),
    ("Plain answer with a < sign and </thin text", False, False,
     {"content": "Plain answer with a < sign and </thin text"}),
]


def parse(text: str, thinking: bool, tools: bool, cuts: list[int]) -> dict:
    p = ChatOutputParser(thinking, tools)
    events, last = [], 0
    for c in [*cuts, len(text)]:
        events += p.feed(text[last:c])
        last = c
    msg = message_fields(events + p.finish(), thinking)
    msg.pop("role")
    if "tool_calls" in msg:
        assert all(c["id"].startswith("call_") for c in msg["tool_calls"])
        msg["tool_calls"] = [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]]
    return msg


@pytest.mark.parametrize("text, thinking, tools, want", CASES)
def test_every_chunking_gives_the_same_message(text, thinking, tools, want):
    assert parse(text, thinking, tools, []) == want
    for i in range(1, len(text)):  # two chunks, cut at every position (inside every marker too)
        assert parse(text, thinking, tools, [i]) == want, i
    assert parse(text, thinking, tools, list(range(1, len(text)))) == want  # one character per chunk
