"""Asynchronous streaming over the engine, for the server: add a request, iterate its deltas, cancel it.

The engine runs in one background thread; every step's new tokens are handed to each request's
asyncio queue on the event loop that asked for it. The event loop never waits for a step: a request
is checked at once and handed over through an inbox, which the engine thread empties between steps,
as it does cancellations (closing a stream, or `abort`): a cancelled request's decode state is freed
before the next step.
"""
from __future__ import annotations

import asyncio
import queue as queues
import threading
from collections.abc import AsyncIterator

from .engine import LLMEngine
from .sampling import RequestError, SamplingParams
from .sequence import RequestOutput, Sequence, Status


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine's state: held by its thread for a whole step
        self._inbox: queues.SimpleQueue = queues.SimpleQueue()  # ("add", seq, loop, queue) | ("abort", id)
        self._inbox_lock = threading.Lock()  # never held during a step: orders submit() against close()
        self._wake = threading.Event()
        self._streams: dict[str, tuple] = {}  # request_id -> (loop, queue, seq); the engine thread's
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
               user: str | None = None, constraint=None) -> tuple[Sequence, asyncio.Queue]:
        """Queue a request (raises RequestError at once on bad input); returns it and its delta queue.
        Never waits for a running step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = self.engine.new_request(prompt, params, request_id, user, constraint)
        with self._inbox_lock:
            if self._closed:  # no thread would ever step it: its stream would wait forever
                raise RuntimeError("AsyncLLM is closed")
            self._inbox.put(("add", seq, loop, queue))
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

    def abort(self, request_id: str) -> None:
        """Cancel a request (before the next step); its stream, if still read, ends with finish_reason "abort"."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def close(self) -> None:
        """Stop the engine thread; requests still in flight end with finish_reason "abort"."""
        with self._inbox_lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        with self._lock:
            self._take_inbox()
            for rid in list(self._streams):
                self._abort(rid)

    # ---- the engine thread ----
    def _take_inbox(self) -> None:
        """Queue the submitted requests and apply the cancellations, in the order they came (under the lock)."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queues.Empty:
                return
            if item[0] == "abort":
                self._abort(item[1])
                continue
            _, seq, loop, queue = item
            try:
                self.engine.enqueue(seq)
            except RequestError as e:  # a request id taken since submit() checked it
                _deliver(loop, queue, e)
                continue
            self._streams[seq.request_id] = (loop, queue, seq)

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            loop, queue, seq = entry
            _deliver(loop, queue, seq.output(delta=True))

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                self._take_inbox()
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
                _deliver(loop, queue, item)


def _deliver(loop, queue: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop has closed
        pass
