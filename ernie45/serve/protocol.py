"""OpenAI-compatible request/response schemas and their mapping onto the engine's SamplingParams.

Field names, defaults and response shapes follow the OpenAI API (and vLLM's extras: top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, allowed_token_ids,
prompt_logprobs, structured_outputs / guided_*, chat_template_kwargs) so the official `openai` client
works unchanged; extras arrive through the client's `extra_body`. The schemas check types and the server's
own limits (``MAX_N``, ``MAX_LOGPROBS``); the ranges of the sampling fields are ``SamplingParams``'s and the
prompt and length rules the engine's (``LLMEngine.check_request``).

Nothing is silently ignored: an OpenAI (or vLLM) field this server knows but does not implement is a 400
naming it (`REFUSED`, checked on the raw JSON before validation); fields nobody here knows pass, as in
vLLM. Fields accepted without effect are only identifiers and hints that change no output: `user`,
`safety_identifier`, `prompt_cache_key` (prefixes are cached automatically), `store: false`,
`service_tier: auto|default`, `modalities: ["text"]`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 16  # completions per prompt: each one holds its own KV blocks
MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20

# field -> (values that are fine because they ask for nothing, why it is refused otherwise)
_COMMON_REFUSED: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), "beam search is not implemented; sample with n instead"),
    "length_penalty": ((1, 1.0), "length_penalty only applies to beam search, which is not implemented"),
    "include_stop_str_in_output": ((False,), "stop strings are always cut from the output here"),
    "truncate_prompt_tokens": ((), "prompts are never truncated here; shorten the prompt"),
    "bad_words": ((), "bad_words is not implemented; use logit_bias with -100"),
    "guided_decoding_backend": ((), "the grammar engine is fixed (llguidance); drop guided_decoding_backend"),
    "guided_whitespace_pattern": ((), "guided_whitespace_pattern is not implemented"),
    "spaces_between_special_tokens": ((True,), "special tokens are always decoded without added spaces"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids is not implemented"),
    "priority": ((0,), "request priorities are not implemented (first come, first served)"),
    "store": ((False,), "stored completions are not implemented (store must be false)"),
    "metadata": ((), "metadata only tags stored completions, which are not implemented"),
    "service_tier": (("auto", "default"), "only service_tier 'auto' / 'default' exists here"),
}
CHAT_REFUSED: dict[str, tuple[tuple, str]] = {
    **_COMMON_REFUSED,
    "audio": ((), "audio output is not supported by this text model"),
    "modalities": ((["text"],), "this model only produces text (modalities must be ['text'])"),
    "prediction": ((), "predicted outputs are not implemented"),
    "web_search_options": ((), "web search is not available"),
    "functions": ((), "the deprecated 'functions' field is not supported: send 'tools'"),
    "function_call": ((), "the deprecated 'function_call' field is not supported: send 'tool_choice'"),
    "reasoning_effort": ((), "reasoning_effort is not implemented; bound the thinking with max_reasoning_tokens"),
    "verbosity": ((), "verbosity is not implemented"),
    "continue_final_message": ((False,), "continue_final_message is not implemented"),
    "echo": ((False,), "echo is not implemented for chat; use /v1/completions"),
}
COMPLETION_REFUSED: dict[str, tuple[tuple, str]] = {
    **_COMMON_REFUSED,
    "suffix": (("",), "suffix (fill-in-the-middle) is not supported: ERNIE 4.5 has no infilling format"),
}


def refuse_unsupported(obj: dict, table: dict[str, tuple[tuple, str]]) -> None:
    """400 naming the first field that asks for something not implemented (None / a no-op value passes)."""
    for name, (harmless, why) in table.items():
        value = obj.get(name)
        if value is None or value in harmless or value in ([], {}):
            continue
        raise APIError(f"{name}={value!r:.80} is not supported: {why}", param=name, code="unsupported_field")


class APIError(Exception):
    """A request the server refuses, rendered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """Turn pydantic's error list into one readable 400 naming each offending field."""
    parts, first = [], None
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        first = first or (str(err["loc"][0]) if err.get("loc") else None)  # the top-level field
        value = err.get("input")
        shown = "" if err.get("type") == "missing" or isinstance(value, dict) else f" (got {value!r:.80})"
        parts.append(f"{loc or 'body'}: {err.get('msg')}{shown}")
    return APIError("invalid request: " + "; ".join(parts), param=first)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, v: bool) -> bool:
        if v:
            raise ValueError("continuous_usage_stats is not implemented; use include_usage")
        return v


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object), json_schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs extra: exactly one of these."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    def model_dump(self, **kw: Any) -> dict:  # report "json", the wire name
        d = super().model_dump(**kw)
        if "json_" in d:
            d["json"] = d.pop("json_")
        return d


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extras: the newer `structured_outputs` object and the older guided_* fields
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids as strings, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} is {bias}; biases are in [-100, 100]")
        return v

    def structured(self) -> dict | None:
        """The one output constraint asked for, as {kind: value} (json, json_object, regex, choice, grammar)."""
        found: list[tuple[str, dict]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError("response_format.json_schema.schema is required for type 'json_schema'",
                               param="response_format")
            found.append(("response_format", {"json": rf.json_schema.schema_}))
        if self.structured_outputs is not None:
            so = {k: v for k, v in self.structured_outputs.model_dump(exclude_none=True).items() if v is not False}
            if so:
                found.append(("structured_outputs", so))
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(self, name) is not None:
                found.append((name, {name[len("guided_"):]: getattr(self, name)}))
        if not found:
            return None
        if len(found) > 1 or len(found[0][1]) > 1:
            names = ", ".join(f"{n} ({', '.join(v)})" for n, v in found)
            raise APIError(f"more than one output constraint given: {names}; give one", param=found[0][0])
        spec = found[0][1]
        if isinstance(spec.get("json"), str):
            import json

            try:
                spec["json"] = json.loads(spec["json"])
            except json.JSONDecodeError as e:
                raise APIError(f"{found[0][0]}: the JSON schema is not valid JSON ({e})", param=found[0][0]) from None
        return spec

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (None means: keep the engine's default)."""
        kw = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                  repetition_penalty=self.repetition_penalty, seed=self.seed, ignore_eos=self.ignore_eos,
                  min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
                  allowed_token_ids=self.allowed_token_ids,
                  logit_bias={int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None)
        if self.stop:
            kw["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.stop_token_ids:
            kw["stop_token_ids"] = list(self.stop_token_ids)
        return {k: v for k, v in kw.items() if v is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: a prompt is text, token ids, or a list of either (one choice set each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    add_special_tokens: bool = False

    refused: ClassVar[dict] = COMPLETION_REFUSED

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError("prompt: must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt given as token ids
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content

    def template_dict(self, i: int) -> dict:
        """The message as chat templates read it (transformers' convention: tool-call arguments as a dict)."""
        import json

        d: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.role not in ("assistant", "tool") and d["content"] is None:
            raise APIError(f"messages[{i}] ({self.role}) has no content", param="messages")
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                try:
                    args = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    raise APIError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({e})",
                                   param="messages") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            d["tool_calls"] = calls
        return d


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(..., min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions: `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # checked even without logprobs: true
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict] | None = None
    # the thinking budget: our name, vLLM's (`thinking_token_budget`, PR #20859) and FastDeploy's
    max_reasoning_tokens: int | None = Field(None, ge=1)
    thinking_token_budget: int | None = Field(None, ge=1)
    reasoning_max_tokens: int | None = Field(None, ge=1)

    refused: ClassVar[dict] = CHAT_REFUSED

    def message_dicts(self) -> list[dict]:
        # "developer" is the newer OpenAI name of the system role
        return [m.template_dict(i) for i, m in enumerate(self.messages)]

    def tool_dicts(self) -> list[dict] | None:
        """The tools the template renders: none when tool_choice is 'none' (the model must not call them)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_tools(self) -> list[FunctionDef] | None:
        """The functions a call is forced among (tool_choice required / named), else None."""
        if self.tool_choice is None or self.tool_choice in ("none", "auto"):
            if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
                raise APIError("tool_choice 'auto' needs tools", param="tool_choice")
            return None
        if not self.tools:
            raise APIError("tool_choice needs a non-empty tools list", param="tool_choice")
        if self.tool_choice == "required":
            return [t.function for t in self.tools]
        name = self.tool_choice.function.name
        match = [t.function for t in self.tools if t.function.name == name]
        if not match:
            raise APIError(f"tool_choice names the function {name!r}, which is not among the tools "
                           f"({', '.join(t.function.name for t in self.tools)})", param="tool_choice")
        return match

    @property
    def reasoning_budget(self) -> int | None:
        given = [v for v in (self.max_reasoning_tokens, self.thinking_token_budget, self.reasoning_max_tokens)
                 if v is not None]
        if len(set(given)) > 1:
            raise APIError("max_reasoning_tokens, thinking_token_budget and reasoning_max_tokens name the same "
                           "budget; give one", param="max_reasoning_tokens")
        return given[0] if given else None


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # vLLM's default; ERNIE adds no BOS either way (add_bos_token=False)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, max_model_len: int, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "ernie45", "root": name,
            "max_model_len": max_model_len}
