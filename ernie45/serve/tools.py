"""Tool calls in ERNIE's output: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks.

This is the Hermes-like wire format of ERNIE-4.5-21B-A3B-Thinking (vLLM's `ernie45` tool parser, PRs
#25027/#44310; FastDeploy's `ernie-x1`): after the thinking section, the answer is either
`<response>\\n...\\n</response>` or one or more tool-call blocks. `ContentParser` turns the answer
text into OpenAI content and `tool_calls`, incrementally: `feed()` takes text as it streams and returns
events, holding back any tail that could still become a marker (`<tool_call>` split over two chunks)
and whitespace that the final answer would strip; `finish()` flushes. Streamed and one-shot parsing are
the same code, so they agree by construction.

A block whose JSON does not parse stays in the content, as vLLM does: the client sees what the model
wrote instead of losing it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_call(body: str) -> dict | None:
    """{"name", "arguments" (a JSON string)} of one block's JSON, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker (it may complete later)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class Stripper:
    """Emit a section's text with its leading and trailing whitespace removed, incrementally:
    leading whitespace is dropped, trailing whitespace waits until more text follows it."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body):]
        self.started = True
        return out


class ContentParser:
    """The answer after any thinking: `<response>` framing removed, tool-call blocks parsed (if `tools`).

    Events: ("content", text) and ("tool_call", {"id", "name", "arguments"})."""

    def __init__(self, tools: bool) -> None:
        self.tools = tools
        self.markers = (RESPONSE_OPEN, RESPONSE_CLOSE) + ((TOOL_OPEN,) if tools else ())
        self.buf = ""
        self.in_call = False
        self.text = Stripper()
        self.n_calls = 0

    def _content(self, text: str, events: list) -> None:
        out = self.text.push(text)
        if out:
            events.append(("content", out))

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        events: list = []
        while True:
            if self.in_call:
                i = self.buf.find(TOOL_CLOSE)
                if i < 0:
                    return events
                self._close_call(self.buf[:i], events)
                self.buf = self.buf[i + len(TOOL_CLOSE):]
                continue
            hits = [(self.buf.find(m), m) for m in self.markers]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                keep = held_suffix(self.buf, self.markers)
                self._content(self.buf[:len(self.buf) - keep], events)
                self.buf = self.buf[len(self.buf) - keep:]
                return events
            i, m = min(hits)
            self._content(self.buf[:i], events)
            self.buf = self.buf[i + len(m):]
            if m == TOOL_OPEN:
                self.in_call = True

    def _close_call(self, body: str, events: list) -> None:
        self.in_call = False
        call = parse_tool_call(body.strip())
        if call is None:  # not a call: keep the model's text
            self._content(TOOL_OPEN + body + TOOL_CLOSE, events)
            return
        self.n_calls += 1
        events.append(("tool_call", {"id": new_call_id(), **call}))

    def finish(self) -> list[tuple[str, Any]]:
        """End of output: a call left open (the model stopped before `</tool_call>`) is parsed if it can be."""
        events: list = []
        if self.in_call:
            body, self.buf = self.buf, ""
            call = parse_tool_call(body.strip())
            if call is not None:
                self.in_call = False
                self.n_calls += 1
                events.append(("tool_call", {"id": new_call_id(), **call}))
            else:
                self._content(TOOL_OPEN + body, events)
        elif self.buf:
            self._content(self.buf, events)
            self.buf = ""
        return events


def tool_call_json(call: dict, index: int | None = None) -> dict:
    """OpenAI's tool_calls entry (with `index` in stream deltas)."""
    out = {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    return out if index is None else {"index": index, **out}
