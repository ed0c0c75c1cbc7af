"""The two generation routes: request -> SamplingParams -> engine -> OpenAI JSON or Server-Sent Events.

`GenerationService` holds what both routes share (engine bridge, tokenizer, limits) and turns engine
outputs into OpenAI's shapes: `text_completion` / `chat.completion` objects, their `.chunk` stream
variants, legacy completion logprobs (with the prompt's under `echo`, as lm-eval reads them), vLLM's
`prompt_logprobs`, and chat `logprobs.content`. A chat choice's text goes through `ChatOutputParser`
(serve/reasoning.py, serve/tools.py) when the template thinks or tools are offered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ernie45.serve.async_engine import AsyncEngine, EngineDeadError
from ernie45.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    usage,
)
from ernie45.serve.reasoning import ChatOutputParser, delta_fields, message_fields

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


def engine_error(e: BaseException) -> APIError | None:
    """The HTTP error for what the engine raised when it refused a request (None: not a refusal)."""
    from ernie45.engine.errors import QueueFullError, RequestError

    if isinstance(e, QueueFullError):
        return APIError(f"the server is busy: {e}; retry later", status=429, type="rate_limit_error",
                        code="queue_full")
    if isinstance(e, EngineDeadError):
        return APIError(str(e), status=503, type="server_error")
    if isinstance(e, RequestError):
        return APIError(str(e), param=e.param, code=e.code)
    if isinstance(e, ValueError):
        return APIError(str(e))
    return None


class GenerationService:
    """Shared by /v1/completions and /v1/chat/completions."""

    def __init__(self, aengine: AsyncEngine, model_name: str):
        from ernie45.engine.sampling_params import SamplingParams

        self.aengine = aengine
        self.engine = aengine.engine
        self.tokenizer = aengine.engine.tokenizer
        self.model_name = model_name
        self.max_model_len = int(aengine.engine.max_model_len)
        self._SamplingParams = SamplingParams

    # ---- request -> engine ---------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model {model!r} does not exist; this server serves {self.model_name!r} "
                           "(see GET /v1/models)", status=404, param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt; the engine checks them (vocabulary, length) when the request is added, and
        :meth:`check_scored` before a prompt is scored without (or before) generating."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as a list of token ids",
                               param="prompt")
            # ERNIE prompts are encoded without BOS, as the model card's own example does
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return list(prompt)

    def check_scored(self, ids: list[int]) -> None:
        """The engine's own prompt checks for a prompt that is scored (echo, prompt_logprobs) rather than only
        generated from: scoring alone may fill the whole context."""
        try:
            self.engine.check_request(ids, None, score_only=True)
        except Exception as e:  # noqa: BLE001 - mapped to HTTP below, else re-raised
            err = engine_error(e)
            if err is None:
                raise
            raise err from None

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                        logprobs: int | None, extra_stop_ids: list[int] | None = None, **extra: Any) -> Any:
        """The request's SamplingParams (max_tokens None: until the context is full); SamplingParams
        validates the ranges and names the field; ``extra``: structured output and reasoning fields."""
        kw = req.sampling_kwargs()
        kw["max_tokens"] = max_tokens
        kw["logprobs"] = logprobs
        kw.update(extra)
        if extra_stop_ids and not req.ignore_eos:
            kw["stop_token_ids"] = sorted(set(kw.get("stop_token_ids", [])) | set(extra_stop_ids))
        try:
            return self._SamplingParams(**kw)
        except (ValueError, TypeError) as e:
            raise engine_error(e) or APIError(f"invalid sampling parameters: {e}") from None

    async def submit(self, base_id: str, prompts: list[list[int]], params: Any) -> tuple[asyncio.Queue, list[str]]:
        """Add one engine request per prompt; all outputs arrive on one queue. 4xx/503 on refusal."""
        q: asyncio.Queue = asyncio.Queue()
        arrival = time.monotonic()
        ids: list[str] = []
        try:
            for i, ids_ in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                await self.aengine.add(rid, ids_, params, q, arrival)
                ids.append(rid)
        except BaseException as e:
            for rid in ids:
                self.aengine.abort(rid)
            err = engine_error(e)
            if err is None:
                raise
            if err.status == 429:
                self.aengine.metrics.observe_rejected(429)
            raise err from None
        return q, ids

    # ---- engine -> client -----------------------------------------------------------------------------
    async def collect(self, q: asyncio.Queue, ids: list[str], is_disconnected: Callable) -> dict[str, Any]:
        """Wait for every request's final output; abort them all if the client goes away."""
        final: dict[str, Any] = {}
        try:
            while len(final) < len(ids):
                try:
                    item = await asyncio.wait_for(q.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await is_disconnected():
                        log.info("client disconnected; aborting %s", ids)
                        raise APIError("client disconnected", status=499) from None
                    continue
                if isinstance(item, BaseException):
                    raise APIError(str(item), status=503, type="server_error")
                if item.finished:
                    final[item.request_id] = item
        finally:
            for rid in ids:
                if rid not in final:
                    self.aengine.abort(rid)
        return final

    async def events(self, q: asyncio.Queue, ids: list[str]) -> AsyncIterator[Any]:
        """Yield outputs as they come; on cancellation (client gone) abort what is unfinished."""
        pending = set(ids)
        try:
            while pending:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    pending.discard(item.request_id)
                yield item
        finally:
            for rid in pending:
                self.aengine.abort(rid)

    async def score(self, prompt_ids: list[int], k: int) -> list:
        """Prompt logprobs (ernie45.engine.scoring) computed on the engine thread between steps."""
        from ernie45.engine.scoring import prompt_logprobs

        try:
            return await self.aengine.call(lambda engine: prompt_logprobs(engine.model, prompt_ids, k))
        except EngineDeadError as e:
            raise APIError(str(e), status=503, type="server_error") from None
        except ValueError as e:
            raise APIError(str(e), param="echo") from None

    def prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        """What `echo` puts before the completion: the prompt as sent, or its ids decoded."""
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    def echo_logprobs(self, prompt_ids: list[int], scores: list, k: int) -> dict:
        """Legacy logprobs of the prompt tokens (the first has none), the shape lm-eval's local-completions reads."""
        tokens, token_lps, tops, offsets, pos = [], [], [], [], 0
        for tid, sc in zip(prompt_ids, scores):
            s = self.token_str(tid)
            tokens.append(s)
            token_lps.append(None if sc is None else sc.logprob)
            if sc is None:
                tops.append(None)
            else:
                top = {s: sc.logprob}
                for t, lp in sc.top[:k]:
                    top.setdefault(self.token_str(t), lp)
                tops.append(top if k else None)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def vllm_prompt_logprobs(self, scores: list, k: int) -> list:
        """vLLM's `prompt_logprobs`: per prompt token None or {id: {logprob, rank, decoded_token}}."""
        out: list = []
        for sc in scores:
            if sc is None:
                out.append(None)
                continue
            entry = {str(sc.token_id): {"logprob": sc.logprob, "rank": sc.rank,
                                        "decoded_token": self.token_str(sc.token_id)}}
            for r, (t, lp) in enumerate(sc.top[:k], start=1):
                entry.setdefault(str(t), {"logprob": lp, "rank": r, "decoded_token": self.token_str(t)})
            out.append(entry)
        return out

    def token_str(self, tid: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int,
                            offset0: int = 0) -> dict:
        """OpenAI's legacy completions logprobs object for the given generated tokens."""
        tokens, token_lps, tops, offsets = [], [], [], []
        pos = offset0
        for tid, lp in zip(token_ids, logprobs):
            s = self.token_str(tid)
            tokens.append(s)
            token_lps.append(lp.get(tid))
            best = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
            tops.append({self.token_str(t): v for t, v in best} if k else None)
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> dict:
        content = []
        for tid, lp in zip(token_ids, logprobs):
            s = self.token_str(tid)
            best = sorted(lp.items(), key=lambda kv: -kv[1])[:k]
            content.append({"token": s, "logprob": lp.get(tid), "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token_str(t), "logprob": v,
                                              "bytes": list(self.token_str(t).encode())} for t, v in best]})
        return {"content": content}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(e: BaseException) -> str:
    err = e if isinstance(e, APIError) else APIError(str(e), status=500, type="server_error")
    return sse({"error": err.body()["error"]})


def merge_logprobs(first: dict, second: dict | None) -> dict:
    """Prompt logprobs (echo) followed by the generated tokens', offsets continuing after the prompt."""
    if second is None:
        return first
    shift = first["text_offset"][-1] + len(first["tokens"][-1]) if first["tokens"] else 0
    return {"tokens": first["tokens"] + second["tokens"],
            "token_logprobs": first["token_logprobs"] + second["token_logprobs"],
            "top_logprobs": first["top_logprobs"] + second["top_logprobs"],
            "text_offset": first["text_offset"] + [o + shift for o in second["text_offset"]]}


async def completion_stream(svc: GenerationService, req: CompletionRequest, q: asyncio.Queue | None,
                            ids: list[str], cid: str, created: int, n: int, k: int | None,
                            head_choices: list[dict] | None = None, prompt_tokens_total: int = 0
                            ) -> AsyncIterator[str]:
    """SSE for /v1/completions: choice index = prompt index * n + completion index. `head_choices`
    (echoed prompts, prompt logprobs) go out first; with no queue (max_tokens 0) they are all there is."""
    seen: dict[tuple[str, int], int] = {}  # (request, completion) -> tokens already sent
    prompt_tokens, completion_tokens = {}, {}
    try:
        if head_choices:
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": svc.model_name,
                       "choices": head_choices})
        async for out in (svc.events(q, ids) if q is not None else _nothing()):
            p = ids.index(out.request_id)
            prompt_tokens[p] = len(out.prompt_token_ids)
            choices = []
            for o in out.outputs:
                if not (o.delta_text or o.finish_reason):
                    continue  # e.g. half a multi-byte character: its token goes out with the next chunk
                prev = seen.get((out.request_id, o.index), 0)
                new_ids = o.token_ids[prev:]
                seen[(out.request_id, o.index)] = len(o.token_ids)
                lps = None
                if k is not None and o.logprobs is not None:
                    lps = svc.completion_logprobs(new_ids, o.logprobs[prev:len(o.token_ids)], k)
                choices.append({"index": p * n + o.index, "text": o.delta_text, "logprobs": lps,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
            if out.finished:
                completion_tokens[p] = sum(len(o.token_ids) for o in out.outputs)
            if choices:
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": svc.model_name,
                           "choices": choices})
        if req.include_usage:
            n_prompt = sum(prompt_tokens.values()) if q is not None else prompt_tokens_total
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": svc.model_name,
                       "choices": [], "usage": usage(n_prompt, sum(completion_tokens.values()))})
    except Exception as e:  # the engine died mid-stream: tell the client in-band, then close cleanly
        log.exception("completion stream failed")
        yield sse_error(e)
    yield "data: [DONE]\n\n"


async def _nothing() -> AsyncIterator[Any]:
    return
    yield


class ChatPlan:
    """How a chat request's output is read: parsed (thinking template, tools) or passed through."""

    def __init__(self, parse: bool, thinking: bool, tools: bool, thinking_template: bool, parallel: bool = True):
        self.parse, self.thinking, self.tools = parse, thinking, tools
        self.thinking_template, self.parallel = thinking_template, parallel

    def parser(self) -> ChatOutputParser | None:
        return ChatOutputParser(self.thinking, self.tools) if self.parse else None

    def keep(self, events: list, calls_before: int) -> list:
        """parallel_tool_calls=false: at most one call per choice."""
        if self.parallel:
            return events
        out = []
        for kind, v in events:
            if kind == "tool_call":
                if calls_before >= 1:
                    continue
                calls_before += 1
            out.append((kind, v))
        return out

    def message(self, text: str) -> tuple[dict, bool]:
        """The non-streamed message of a finished choice and whether it holds tool calls."""
        if not self.parse:
            return {"role": "assistant", "content": text}, False
        p = self.parser()
        events = self.keep(p.feed(text) + p.finish(), 0)
        msg = message_fields(events, self.thinking_template)
        return msg, bool(msg.get("tool_calls"))


def chat_finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


async def chat_stream(svc: GenerationService, req: ChatCompletionRequest, q: asyncio.Queue, ids: list[str],
                      cid: str, created: int, k: int | None, plan: ChatPlan) -> AsyncIterator[str]:
    """SSE for /v1/chat/completions: a role chunk per choice, deltas (reasoning_content, content, tool_calls),
    a finish chunk, usage."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name}
    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(req.n)]})
    seen: dict[int, int] = {}
    parsers = {i: plan.parser() for i in range(req.n)}
    calls = dict.fromkeys(range(req.n), 0)
    prompt_tokens = completion_tokens = 0
    try:
        async for out in svc.events(q, ids):
            prompt_tokens = len(out.prompt_token_ids)
            chunks: list[dict] = []
            for o in out.outputs:
                if not (o.delta_text or o.finish_reason):
                    continue
                prev = seen.get(o.index, 0)
                new_ids = o.token_ids[prev:]
                seen[o.index] = len(o.token_ids)
                lps = None
                if k is not None and o.logprobs is not None:
                    lps = svc.chat_logprobs(new_ids, o.logprobs[prev:len(o.token_ids)], k)
                parser = parsers[o.index]
                if parser is None:
                    deltas = [{"content": o.delta_text}] if o.delta_text else []
                else:
                    events = parser.feed(o.delta_text) + (parser.finish() if o.finish_reason else [])
                    deltas, calls[o.index] = delta_fields(plan.keep(events, calls[o.index]), calls[o.index])
                reason = chat_finish_reason(o.finish_reason, calls[o.index] > 0)
                if not deltas:
                    deltas = [{}] if (reason or lps) else []
                for j, delta in enumerate(deltas):
                    last = j == len(deltas) - 1
                    chunks.append({"index": o.index, "delta": delta, "logprobs": lps if j == 0 else None,
                                   "finish_reason": reason if last else None,
                                   "stop_reason": o.stop_reason if last else None})
            if out.finished:
                completion_tokens = sum(len(o.token_ids) for o in out.outputs)
            for c in chunks:
                yield sse({**head, "choices": [c]})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except Exception as e:
        log.exception("chat stream failed")
        yield sse_error(e)
    yield "data: [DONE]\n\n"
