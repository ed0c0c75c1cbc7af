"""A chat request -> the prompt text, how its output is read, and the sampling extras it needs.

The checkpoint's own template renders the messages, the tools and `chat_template_kwargs`
(ernie45/chat_template.py). Whether the output is parsed follows from that: a template with a
`<think>` section gets the reasoning parser, offered tools get the tool-call parser, and both need the
special tokens the detokenizer otherwise drops. `tool_choice: required` or a named function becomes a
grammar over `<tool_call>` blocks whose arguments follow each function's JSON schema; `response_format`
and vLLM's structured-output extras become a grammar on the answer (after the thinking, if any).
"""

from __future__ import annotations

from typing import Any

from ernie45.chat_template import ChatTemplateError
from ernie45.engine.structured import tool_call_lark
from ernie45.serve.openai_api import ChatPlan
from ernie45.serve.protocol import APIError, ChatCompletionRequest
from ernie45.serve.reasoning import THINK_CLOSE, THINK_OPEN, starts_thinking


def plan_chat(tokenizer: Any, req: ChatCompletionRequest) -> tuple[str, ChatPlan, dict]:
    """(prompt text, output plan, SamplingParams extras) of a validated chat request; 400 on misuse."""
    template = tokenizer.chat_template or ""
    tools = req.tool_dicts()
    if tools and "tools" not in template:
        raise APIError("this model's chat template does not render tools, so it cannot call them; use a "
                       "checkpoint whose chat_template renders `tools` (e.g. ERNIE-4.5-21B-A3B-Thinking)",
                       param="tools")
    kwargs = dict(req.chat_template_kwargs or {})
    clash = sorted(set(kwargs) & {"messages", "tools", "documents", "add_generation_prompt"})
    if clash:
        raise APIError(f"chat_template_kwargs cannot set {', '.join(clash)}; send them as request fields",
                       param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(req.message_dicts(), add_generation_prompt=req.add_generation_prompt,
                                             tools=tools, documents=req.documents, **kwargs)
    except ChatTemplateError as e:
        raise APIError(f"messages: {e}", param="messages") from None
    except ValueError as e:
        raise APIError(f"messages: {e}", param="messages") from None

    thinking_template = THINK_OPEN in template
    thinking = starts_thinking(text)
    extra: dict[str, Any] = {}
    forced = req.forced_tools()
    structured = req.structured()
    if forced is not None:
        if structured is not None:
            raise APIError("tool_choice forces a tool call; it cannot be combined with response_format or "
                           "another output constraint", param="tool_choice")
        parallel = req.parallel_tool_calls and req.tool_choice == "required"
        structured = {"lark": tool_call_lark([f.model_dump() for f in forced], parallel=parallel)}
    budget = req.reasoning_budget
    if budget is not None:
        if not thinking:
            raise APIError("max_reasoning_tokens needs a thinking template (the prompt must end inside <think>)",
                           param="max_reasoning_tokens")
        extra["max_reasoning_tokens"] = budget
    if thinking and (structured is not None or budget is not None):
        extra["reasoning_end"] = THINK_CLOSE  # the constraint applies after the thinking; the budget closes it
    if structured is not None:
        extra["structured"] = structured
    parse = thinking_template or thinking or tools is not None
    if parse:
        extra["skip_special_tokens"] = False  # the parsers must see <think>, <tool_call>, ... even if special
    plan = ChatPlan(parse=parse, thinking=thinking, tools=tools is not None, thinking_template=thinking_template,
                    parallel=req.parallel_tool_calls)
    return text, plan, extra
