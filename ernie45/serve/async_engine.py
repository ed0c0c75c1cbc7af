"""The asyncio bridge: ONE LLMEngine stepping in a background thread, many HTTP requests awaiting it.

The engine is plain single-threaded Python, so only its own thread ever touches it: the HTTP loop sends
commands (add / abort) through a thread-safe queue, and the engine thread applies them between steps,
answering each add through a concurrent Future (so a prompt that is too long or a full waiting queue
becomes an HTTP error before any streaming starts). Every output leaving `step()` is copied (the engine
may keep mutating its own objects) and handed to the request's asyncio.Queue with
`loop.call_soon_threadsafe`. Metrics (TTFT, inter-token latency, end-to-end latency) are observed here,
where the token actually leaves the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

from ernie45.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a crash inside step(), or shutdown); no request can be served."""


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float  # time.monotonic() when the HTTP request arrived
    last_token: float | None = None  # when the previous step gave this request new tokens


def snapshot(out: Any) -> Any:
    """A copy of a RequestOutput that later engine steps cannot change under the HTTP loop's feet."""
    outs = [dataclasses.replace(o, token_ids=list(o.token_ids), delta_token_ids=list(o.delta_token_ids),
                                logprobs=list(o.logprobs) if o.logprobs is not None else None)
            for o in out.outputs]
    return dataclasses.replace(out, outputs=outs, prompt_token_ids=list(out.prompt_token_ids),
                               metrics=dict(out.metrics or {}))


class AsyncEngine:
    """Owns the engine thread. `add()` submits; outputs arrive on the caller's asyncio.Queue."""

    def __init__(self, engine: Any, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stats: dict = engine.stats()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ernie45-engine", daemon=True)

    # ---- called from the HTTP event loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still open get EngineDeadError."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stats(self) -> dict:
        """The engine's stats() as of its last step (read without touching the engine)."""
        return dict(self._stats)

    async def add(self, request_id: str, prompt: str | list[int], params: Any, out_queue: asyncio.Queue,
                  arrival: float) -> None:
        """Admit one request; raises what engine.add_request raises (ValueError, QueueFullError)."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        stream = _Stream(asyncio.get_running_loop(), out_queue, arrival)
        self._commands.put(("add", request_id, prompt, params, stream, fut))
        await asyncio.wrap_future(fut)

    async def call(self, fn: Any) -> Any:
        """Run `fn(engine)` on the engine thread between two steps (e.g. scoring a prompt) and return its
        result; nothing else touches the model meanwhile."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running ({self.error!r})")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, fut))
        return await asyncio.wrap_future(fut)

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone): the engine thread frees its KV blocks before its next step."""
        self._commands.put(("abort", request_id))

    # ---- the engine thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._stats = self.engine.stats()
        except BaseException as e:  # a crash in the engine must not leave clients hanging forever
            log.exception("engine thread crashed")
            self.error = e
        finally:
            err = EngineDeadError(f"the engine stopped ({self.error!r})" if self.error else "the server is stopping")
            for rid, st in list(self._streams.items()):
                self._send(rid, st, err)
            self._streams.clear()
            while True:  # answer adds that raced the shutdown
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    cmd[5].set_exception(err)
                elif cmd[0] == "call":
                    cmd[2].set_exception(err)

    def _apply_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd[0] == "add":
                _, rid, prompt, params, stream, fut = cmd
                try:
                    self.engine.add_request(rid, prompt, params)
                except Exception as e:  # bad prompt / full queue: the HTTP handler turns it into 4xx
                    fut.set_exception(e)
                else:
                    self._streams[rid] = stream
                    fut.set_result(None)
            elif cmd[0] == "call":
                _, fn, fut = cmd
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # a bad request (ValueError) or a failure: the caller decides
                    fut.set_exception(e)
            elif cmd[0] == "abort" and (st := self._streams.pop(cmd[1], None)) is not None:
                self.engine.abort(cmd[1])
                self.metrics.observe_finished("abort", time.monotonic() - st.arrival)
                log.info("aborted request %s (client gone)", cmd[1])
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list) -> None:
        t = time.monotonic()
        for out in outputs:
            st = self._streams.get(out.request_id)
            if st is None:  # aborted while the step ran
                continue
            if any(o.delta_token_ids for o in out.outputs):
                if st.last_token is None:
                    self.metrics.observe_ttft(t - st.arrival)
                else:
                    self.metrics.observe_itl(t - st.last_token)
                st.last_token = t
            if out.finished:
                del self._streams[out.request_id]
                reasons = {o.finish_reason or "abort" for o in out.outputs}
                self.metrics.observe_finished("length" if reasons == {"length"} else sorted(reasons)[-1],
                                              t - st.arrival)
            self._send(out.request_id, st, snapshot(out))

    def _send(self, rid: str, st: _Stream, item: Any) -> None:
        try:
            st.loop.call_soon_threadsafe(st.queue.put_nowait, item)
        except RuntimeError:  # the HTTP loop is closed: nobody will read this request any more
            if rid in self._streams:
                del self._streams[rid]
                self.engine.abort(rid)
