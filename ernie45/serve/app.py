"""The FastAPI app: OpenAI routes under /v1, /health, /metrics, the chat page at /, and `serve()`.

Security defaults: `serve()` binds 127.0.0.1 unless told otherwise; with an API key every /v1 route needs
`Authorization: Bearer <key>` (the page, /health and /metrics stay open, as in vLLM). Request bodies are
capped (`max_body_bytes`, 413) before they are parsed.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ernie45.serve.async_engine import AsyncEngine
from ernie45.serve.chat import plan_chat
from ernie45.serve.metrics import ServerMetrics
from ernie45.serve.openai_api import (
    GenerationService,
    chat_finish_reason,
    chat_stream,
    completion_stream,
    merge_logprobs,
)
from ernie45.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    model_card,
    new_id,
    now,
    refuse_unsupported,
    usage,
    validation_error,
)

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_json(request: Request, model_cls: type, limit: int) -> Any:
    """Read at most `limit` bytes of body (413 beyond), parse JSON (400), validate into `model_cls` (400)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(f"request body of {int(declared)} bytes exceeds the server's limit of {limit} bytes "
                       "(--max-body-bytes)", status=413, code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"request body exceeds the server's limit of {limit} bytes (--max-body-bytes)",
                           status=413, code="body_too_large")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(f"request body must be a JSON object, got {type(obj).__name__}")
    refuse_unsupported(obj, getattr(model_cls, "refused", {}))
    try:
        return model_cls.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e) from None


def build_app(engine: Any, model_name: str, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """An app serving `engine` (an LLMEngine) under `model_name`; the engine thread runs with the app."""
    metrics = ServerMetrics(model_name)
    aengine = AsyncEngine(engine, metrics)
    svc = GenerationService(aengine, model_name)
    created = now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        log.info("serving %s (max_model_len=%d)", model_name, svc.max_model_len)
        yield
        aengine.shutdown()

    app = FastAPI(title="ernie45", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.aengine = aengine
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        if e.status >= 500:
            log.error("%s %s -> %d: %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        err = APIError(msg, status=e.status_code, type="invalid_request_error", code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(f"internal error: {e!r}", 500, "server_error").body(), status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError("invalid or missing API key: send 'Authorization: Bearer <key>'", status=401,
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(model_name, svc.max_model_len, created)]}

    @v1.post("/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await read_json(request, CompletionRequest, max_body_bytes)
        svc.check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(f"best_of={req.best_of} (more candidates than n={req.n} returned) is not supported",
                           param="best_of", code="unsupported_field")
        raw = req.prompts()
        prompts = [svc.encode_prompt(p, req.add_special_tokens) for p in raw]
        cid, t = new_id("cmpl"), now()
        # echo and prompt logprobs: one scoring forward per prompt on the engine thread (engine/scoring.py)
        k_prompt = max(req.logprobs or 0, req.prompt_logprobs or 0)
        want_scores = req.prompt_logprobs is not None or (req.echo and req.logprobs is not None)
        if want_scores or req.max_tokens == 0:
            for ids in prompts:
                svc.check_scored(ids)
        scores = [await svc.score(ids, k_prompt) for ids in prompts] if want_scores else None
        heads: list[dict] = []  # per choice: what goes before the generated text
        for p, ids in enumerate(prompts):
            for i in range(req.n):
                head: dict = {"index": p * req.n + i, "text": "", "logprobs": None}
                if req.echo:
                    head["text"] = svc.prompt_text(raw[p], ids)
                    if req.logprobs is not None:
                        head["logprobs"] = svc.echo_logprobs(ids, scores[p], req.logprobs)
                if req.prompt_logprobs is not None:
                    head["prompt_logprobs"] = svc.vllm_prompt_logprobs(scores[p], req.prompt_logprobs)
                heads.append(head)
        if req.max_tokens == 0:  # score only: nothing is generated
            for h in heads:
                h.update(finish_reason="length", stop_reason=None)
            if req.stream:
                return StreamingResponse(
                    completion_stream(svc, req, None, [], cid, t, req.n, req.logprobs, heads,
                                      sum(len(ids) for ids in prompts)),
                    media_type="text/event-stream", headers=SSE_HEADERS)
            return {"id": cid, "object": "text_completion", "created": t, "model": model_name, "choices": heads,
                    "usage": usage(sum(len(ids) for ids in prompts), 0)}
        params = svc.sampling_params(req, req.max_tokens, req.logprobs, structured=req.structured())
        q, ids = await svc.submit(cid, prompts, params)
        if req.stream:
            firsts = [h for h in heads if h["text"] or h["logprobs"] or "prompt_logprobs" in h]
            for h in firsts:
                h.update(finish_reason=None)
            return StreamingResponse(completion_stream(svc, req, q, ids, cid, t, req.n, req.logprobs, firsts),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        final = await svc.collect(q, ids, request.is_disconnected)
        choices, n_prompt, n_completion = [], 0, 0
        for p, rid in enumerate(ids):
            out = final[rid]
            n_prompt += len(out.prompt_token_ids)
            for o in out.outputs:
                n_completion += len(o.token_ids)
                head = heads[p * req.n + o.index]
                lps = None
                if req.logprobs is not None and o.logprobs is not None:
                    lps = svc.completion_logprobs(o.token_ids, o.logprobs, req.logprobs)
                    if head["logprobs"] is not None:
                        lps = merge_logprobs(head["logprobs"], lps)
                choices.append({**head, "text": head["text"] + o.text, "logprobs": lps,
                                "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        return {"id": cid, "object": "text_completion", "created": t, "model": model_name, "choices": choices,
                "usage": usage(n_prompt, n_completion)}

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req: ChatCompletionRequest = await read_json(request, ChatCompletionRequest, max_body_bytes)
        svc.check_model(req.model)
        if svc.tokenizer is None:
            raise APIError("this model has no tokenizer, so it cannot chat; use /v1/completions with token ids")
        prompt, plan, extra = plan_chat(svc.tokenizer, req)
        prompt = svc.encode_prompt(prompt)
        k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens == 0:
            raise APIError("max_tokens must be >= 1 for chat", param="max_tokens")
        params = svc.sampling_params(req, max_tokens, k, svc.tokenizer.stop_token_ids, **extra)
        cid, t = new_id("chatcmpl"), now()
        q, ids = await svc.submit(cid, [prompt], params)
        if req.stream:
            return StreamingResponse(chat_stream(svc, req, q, ids, cid, t, k, plan), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        out = (await svc.collect(q, ids, request.is_disconnected))[cid]
        choices = []
        for o in out.outputs:
            lps = svc.chat_logprobs(o.token_ids, o.logprobs, k) if k is not None and o.logprobs is not None else None
            message, has_calls = plan.message(o.text)
            choices.append({"index": o.index, "message": message, "logprobs": lps,
                            "finish_reason": chat_finish_reason(o.finish_reason, has_calls),
                            "stop_reason": o.stop_reason})
        return {"id": cid, "object": "chat.completion", "created": t, "model": model_name, "choices": choices,
                "usage": usage(len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs))}

    # vLLM's tokenizer routes (lm-eval's remote tokenizer uses them), at the root as in vLLM
    tok_routes = APIRouter(dependencies=[Depends(check_key)])

    def need_tokenizer() -> Any:
        if svc.tokenizer is None:
            raise APIError("this model has no tokenizer (no tokenizer.model in the checkpoint)", status=404)
        return svc.tokenizer

    @tok_routes.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req: TokenizeRequest = await read_json(request, TokenizeRequest, max_body_bytes)
        svc.check_model(req.model)
        tok = need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            try:
                chat = ChatCompletionRequest.model_validate({"messages": req.messages, "tools": req.tools,
                                                             "add_generation_prompt": req.add_generation_prompt,
                                                             "chat_template_kwargs": req.chat_template_kwargs})
            except ValidationError as e:
                raise validation_error(e) from None
            ids = svc.tokenizer.encode(plan_chat(tok, chat)[0])
        strs = [svc.token_str(i) for i in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids, "token_strs": strs}

    @tok_routes.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req: DetokenizeRequest = await read_json(request, DetokenizeRequest, max_body_bytes)
        svc.check_model(req.model)
        tok = need_tokenizer()
        vocab = svc.engine.config.vocab_size
        bad = [i for i in req.tokens if not 0 <= i < vocab]
        if bad:
            raise APIError(f"tokens: id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}

    @tok_routes.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tok = need_tokenizer()
        return {"tokenizer_class": "Ernie4_5_Tokenizer", **tok.template_special_tokens(),
                "chat_template": tok.chat_template, "model_max_length": svc.max_model_len,
                "vocab_size": tok.vocab_size}

    app.include_router(tok_routes)
    app.include_router(v1)

    @app.get("/health")
    async def health() -> Any:
        if not aengine.alive:
            return JSONResponse({"status": "error", "error": repr(aengine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(aengine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    return app


def build_engine(model: str = "demo", **engine_kwargs: Any) -> Any:
    """An LLMEngine for serving; None-valued options keep the engine's defaults. A request whose prompt
    plus max_tokens exceeds the context is refused (OpenAI's rule), not cut short."""
    from ernie45.engine.llm import LLMEngine

    engine_kwargs.setdefault("strict_max_tokens", True)
    return LLMEngine(model, **{k: v for k, v in engine_kwargs.items() if v is not None})


class ServerThread:
    """uvicorn in a background thread on an already-bound socket (tests, the benchmark, notebooks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def serve(model: str = "demo", *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          log_level: str = "info", **engine_kwargs: Any) -> None:
    """Load `model` into one engine and serve it over HTTP until interrupted (the `ernie45 serve` verb)."""
    import uvicorn

    engine = build_engine(model, **engine_kwargs)
    app = build_app(engine, served_model_name or model, api_key=api_key, max_body_bytes=max_body_bytes)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info("ernie45 server at http://%s:%d (chat page at /, OpenAI API at /v1)", host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
