"""OpenAI-compatible request/response schemas and their mapping onto the engine's SamplingParams.

Field names, defaults and response shapes follow the OpenAI API (and vLLM's extras: top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) so the official `openai` client works
unchanged; extras arrive through the client's `extra_body`. Unknown fields are ignored, as vLLM does.
The schemas check types and the server's own limits (``MAX_N``); the ranges of the sampling fields are
``SamplingParams``'s and the prompt and length rules the engine's (``LLMEngine.check_request``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16  # completions per prompt: each one holds its own KV blocks
MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20


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

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields this request sets (None means: keep the engine's default)."""
        kw = dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                  repetition_penalty=self.repetition_penalty, seed=self.seed, ignore_eos=self.ignore_eos,
                  min_tokens=self.min_tokens)
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
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions: `max_completion_tokens` is the newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # checked even without logprobs: true
    add_generation_prompt: bool = True

    def message_dicts(self) -> list[dict]:
        # "developer" is the newer OpenAI name of the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


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
