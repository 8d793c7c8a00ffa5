"""A thread that runs blocking generation jobs one at a time and streams their output to the
asyncio caller. Engines whose libraries block (llama.cpp, transformers) use one per model.

`stream(job)` returns an async iterator; `job(emit, cancelled)` runs on the thread, calls
`emit(item)` for each item, and should return soon after `cancelled` is set. Closing the iterator
(client gone, timeout) sets `cancelled`; a job still waiting in the queue is skipped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Emit = Callable[[Any], None]
Job = Callable[[Emit, threading.Event], None]

DONE = object()  # put on a stream's queue after its last item


async def relay(out: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """The items a thread puts on `out` (through `call_soon_threadsafe`) until DONE; an
    exception put there is raised here, in the caller."""
    while True:
        item = await out.get()
        if item is DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass
class _Work:
    job: Job
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Any]
    cancelled: threading.Event = field(default_factory=threading.Event)


class ThreadWorker(Generic[T]):
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.queued = 0
        self.busy = False
        self.completed = 0

    async def stream(self, job: Job) -> AsyncIterator[T]:
        work = _Work(job, asyncio.get_running_loop(), asyncio.Queue())
        self.queued += 1
        self._jobs.put(work)
        try:
            async for item in relay(work.out):
                yield item
        finally:
            work.cancelled.set()

    def close(self) -> None:
        """Stop the thread after the current job (which should notice its cancel flag)."""
        self._jobs.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while (work := self._jobs.get()) is not None:
            self.queued -= 1
            if work.cancelled.is_set():
                continue
            self.busy = True

            def emit(item: Any, work: _Work = work) -> None:
                work.loop.call_soon_threadsafe(work.out.put_nowait, item)

            outcome: object = DONE
            try:
                work.job(emit, work.cancelled)
            except BaseException as exc:  # delivered to the caller, who re-raises it
                outcome = exc
            # Idle before the caller hears the end, so stats read after a stream are settled.
            self.busy = False
            self.completed += 1
            emit(outcome)
