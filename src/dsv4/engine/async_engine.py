"""Asynchronous streaming over the engine, for the server: add a request, iterate its deltas, cancel it.

The engine runs in one background thread; every step's new tokens are handed to each request's
asyncio queue on the event loop that asked for it. Closing a stream (or `abort`) cancels the request
and frees its decode state at once.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from .engine import LLMEngine
from .sampling import SamplingParams
from .sequence import RequestOutput, Sequence, Status


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple] = {}  # request_id -> (loop, queue, seq)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               user: str | None = None, constraint=None) -> tuple[Sequence, asyncio.Queue]:
        """Queue a request (raises RequestError at once on bad input); returns it and its delta queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed:  # no thread would ever step it: its stream would wait forever
                raise RuntimeError("AsyncLLM is closed")
            seq = self.engine.add_request(prompt, params, request_id, user, constraint)
            self._streams[seq.request_id] = (loop, queue, seq)
        self._wake.set()
        return seq, queue

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       user: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutput deltas (new token ids and text) until the request finishes."""
        seq, queue = self.submit(prompt, params, request_id, user)
        async for out in self.stream(seq, queue):
            yield out

    async def stream(self, seq: Sequence, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(seq.request_id)

    def is_waiting(self, request_id: str) -> bool:
        entry = self._streams.get(request_id)
        return entry is not None and entry[2].status == Status.WAITING

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream (if still read) ends with finish_reason "abort"."""
        with self._lock:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            loop, queue, seq = entry
            try:
                loop.call_soon_threadsafe(queue.put_nowait, seq.output(delta=True))
            except RuntimeError:  # the caller's event loop has closed
                pass

    def close(self) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            for rid in list(self._streams):
                self._abort(rid)

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                busy = self.engine.has_unfinished()
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            with self._lock:
                try:
                    self.engine.step()
                    error = None
                except Exception as e:  # a failed step fails its requests, never the thread
                    error = e
                deliveries = []
                for rid, (loop, queue, seq) in list(self._streams.items()):
                    if error is not None and seq.status != Status.FINISHED:
                        self.engine.abort(rid)
                        deliveries.append((loop, queue, RuntimeError(f"engine step failed: {error}")))
                        del self._streams[rid]
                        continue
                    if seq.status == Status.FINISHED or len(seq.output_ids) > seq.sent_tokens:
                        deliveries.append((loop, queue, seq.output(delta=True)))
                        if seq.status == Status.FINISHED:
                            del self._streams[rid]
            for loop, queue, item in deliveries:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the caller's event loop has closed
                    pass
