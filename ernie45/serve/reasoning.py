"""Thinking output: `reasoning_content` apart from `content`, streamed or not.

ERNIE-4.5-21B-A3B-Thinking's template ends the generation prompt with `<think>\\n`, so the model's
output starts inside the thinking section: `reasoning\\n</think>\\n\\n<response>\\ncontent\\n</response>`
or, for a tool call, `reasoning\\n</think>\\n\\n<tool_call>...</tool_call>` (vLLM's `ernie45` reasoning
parser, FastDeploy's `ernie-x1`). A prompt that does not end inside `<think>` has no reasoning unless
the output itself opens one.

`ChatOutputParser` is the one object the chat route feeds: text deltas in, OpenAI delta fields out
(`reasoning_content`, `content`, `tool_calls`). Markers split over chunks (`</th` + `ink>`) are held back
until they can be decided; whitespace that the final answer strips is held back too, so the streamed
pieces concatenate to exactly the non-streamed message.
"""

from __future__ import annotations

from typing import Any

from ernie45.serve.tools import ContentParser, Stripper, held_suffix, tool_call_json

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def starts_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves the model inside an open thinking section."""
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


class ChatOutputParser:
    """Split one choice's output into reasoning, content and tool calls, incrementally."""

    def __init__(self, thinking: bool, tools: bool) -> None:
        self.thinking = thinking  # inside <think> from the first token
        self.at_start = True  # a non-thinking prompt: the output may still open with <think>
        self.buf = ""
        self.reasoning = Stripper()
        self.content = ContentParser(tools)
        self.reasoning_text: list[str] = []

    def _reason(self, text: str, out: list) -> None:
        t = self.reasoning.push(text)
        if t:
            out.append(("reasoning", t))

    def feed(self, text: str) -> list[tuple[str, Any]]:
        """Events ("reasoning", str) / ("content", str) / ("tool_call", dict) for this delta."""
        out: list = []
        self.buf += text
        if not self.thinking and self.at_start:
            lead = self.buf.lstrip()
            if len(lead) < len(THINK_OPEN) and THINK_OPEN.startswith(lead):
                return out  # could still be '<think>'
            self.at_start = False
            if lead.startswith(THINK_OPEN):
                self.thinking, self.buf = True, lead[len(THINK_OPEN):]
        if self.thinking:
            i = self.buf.find(THINK_CLOSE)
            if i < 0:
                keep = held_suffix(self.buf, (THINK_CLOSE,))
                self._reason(self.buf[:len(self.buf) - keep], out)
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            self._reason(self.buf[:i], out)
            self.thinking, self.buf = False, self.buf[i + len(THINK_CLOSE):]
        text, self.buf = self.buf, ""
        out.extend(self.content.feed(text))
        return out

    def finish(self) -> list[tuple[str, Any]]:
        """Flush at the end of the output (a thinking section cut by length stays reasoning)."""
        out: list = []
        text, self.buf = self.buf, ""
        if self.thinking:
            self._reason(text, out)
        elif text:
            out.extend(self.content.feed(text))
        out.extend(self.content.finish())
        return out


def delta_fields(events: list[tuple[str, Any]], calls_so_far: int) -> tuple[list[dict], int]:
    """OpenAI chat deltas for parser events; tool calls are numbered per choice from `calls_so_far`."""
    deltas: list[dict] = []
    for kind, value in events:
        if kind == "reasoning":
            deltas.append({"reasoning_content": value})
        elif kind == "content":
            deltas.append({"content": value})
        else:
            deltas.append({"tool_calls": [tool_call_json(value, calls_so_far)]})
            calls_so_far += 1
    return deltas, calls_so_far


def message_fields(events: list[tuple[str, Any]], thinking_template: bool) -> dict:
    """The non-streamed assistant message: content (None when only tool calls), reasoning_content, tool_calls."""
    reasoning = "".join(v for k, v in events if k == "reasoning")
    content = "".join(v for k, v in events if k == "content")
    calls = [tool_call_json(v) for k, v in events if k == "tool_call"]
    msg: dict = {"role": "assistant", "content": content if content or not calls else None}
    if thinking_template or reasoning:
        msg["reasoning_content"] = reasoning or None
    if calls:
        msg["tool_calls"] = calls
    return msg
