"""The two generation routes: request -> SamplingParams -> engine -> OpenAI JSON or Server-Sent Events.

`GenerationService` holds what both routes share (engine bridge, tokenizer, limits) and turns engine
outputs into OpenAI's shapes: `text_completion` / `chat.completion` objects, their `.chunk` stream
variants, legacy completion logprobs and chat `logprobs.content`.
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

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; the engine checks them (vocabulary, length) when the request is added."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as a list of token ids",
                               param="prompt")
            # ERNIE prompts are encoded without BOS, as the model card's own example does
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(prompt)

    def sampling_params(self, req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                        logprobs: int | None, extra_stop_ids: list[int] | None = None) -> Any:
        """The request's SamplingParams (max_tokens None: until the context is full); SamplingParams
        validates the ranges and names the field."""
        kw = req.sampling_kwargs()
        kw["max_tokens"] = max_tokens
        kw["logprobs"] = logprobs
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


async def completion_stream(svc: GenerationService, req: CompletionRequest, q: asyncio.Queue, ids: list[str],
                            cid: str, created: int, n: int, k: int | None) -> AsyncIterator[str]:
    """SSE for /v1/completions: choice index = prompt index * n + completion index."""
    seen: dict[tuple[str, int], int] = {}  # (request, completion) -> tokens already sent
    prompt_tokens, completion_tokens = {}, {}
    try:
        async for out in svc.events(q, ids):
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
            yield sse({"id": cid, "object": "text_completion", "created": created, "model": svc.model_name,
                       "choices": [], "usage": usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))})
    except Exception as e:  # the engine died mid-stream: tell the client in-band, then close cleanly
        log.exception("completion stream failed")
        yield sse_error(e)
    yield "data: [DONE]\n\n"


async def chat_stream(svc: GenerationService, req: ChatCompletionRequest, q: asyncio.Queue, ids: list[str],
                      cid: str, created: int, k: int | None) -> AsyncIterator[str]:
    """SSE for /v1/chat/completions: a role chunk per choice, content deltas, a finish chunk, usage."""
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": svc.model_name}
    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for i in range(req.n)]})
    seen: dict[int, int] = {}
    prompt_tokens = completion_tokens = 0
    try:
        async for out in svc.events(q, ids):
            prompt_tokens = len(out.prompt_token_ids)
            choices = []
            for o in out.outputs:
                if not (o.delta_text or o.finish_reason):
                    continue
                prev = seen.get(o.index, 0)
                new_ids = o.token_ids[prev:]
                seen[o.index] = len(o.token_ids)
                lps = None
                if k is not None and o.logprobs is not None:
                    lps = svc.chat_logprobs(new_ids, o.logprobs[prev:len(o.token_ids)], k)
                delta = {"content": o.delta_text} if o.delta_text else {}
                choices.append({"index": o.index, "delta": delta, "logprobs": lps, "finish_reason": o.finish_reason,
                                "stop_reason": o.stop_reason})
            if out.finished:
                completion_tokens = sum(len(o.token_ids) for o in out.outputs)
            if choices:
                yield sse({**head, "choices": choices})
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    except Exception as e:
        log.exception("chat stream failed")
        yield sse_error(e)
    yield "data: [DONE]\n\n"
