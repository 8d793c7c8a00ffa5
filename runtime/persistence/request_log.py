"""The request log writer: records are queued without waiting (a request never waits on the
database), written in batches by one background task, and spooled to a JSON-lines file while
the database is down, then replayed when it answers again. Nothing is lost: a record is either
in the queue, in the spool, or committed; a replay that repeats committed rows is ignored by
the store (same `record_id`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from runtime.persistence.spool import Spool
from runtime.persistence.store import RequestLogStore
from runtime.telemetry.live_stats import GenerationRequestRecord


@dataclass(frozen=True)
class WriterSettings:
    batch_size: int = 100
    flush_interval_s: float = 0.5  # the longest a batch waits to fill once it has a record
    queue_size: int = 10_000  # beyond it, records go straight to the spool
    retry_interval_s: float = 2.0  # while down: how often the database is tried again


def to_row(record: GenerationRequestRecord) -> dict[str, Any]:
    """A log row from a live record, with a fresh `record_id`."""
    return {
        "record_id": str(uuid.uuid4()),
        "request_id": record.id,
        "time": record.time,
        "key_name": record.key_name,
        "model": record.model,
        "provider": record.provider,
        "transport": record.transport,
        "endpoint": record.endpoint,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_s": record.latency_s,
        "ttft_s": record.ttft_s,
        "status": record.status,
        "cost": record.cost,
        "finish_reasons": ",".join(record.finish_reasons),
    }


class RequestLogWriter:
    """Owns the queue, the spool file and the background task that drains them.

    Records stay in the queue until the one write that takes them, under `_lock`: waiting
    for a batch to fill removes nothing, so cancelling the task loses nothing, and `flush()`
    (under the same lock) sees every record that is not yet committed or spooled."""

    def __init__(
        self,
        store: RequestLogStore,
        spool: Spool,
        settings: WriterSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.spool = spool
        self.settings = settings or WriterSettings()
        self._clock = clock
        self._queue: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The batch being written; written again by close() if the task was cancelled during
        # the write (inserts skip rows already there, so a second write is harmless).
        self._writing: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()  # one write (and one replay) at a time
        self._closing = False
        self._retry_at = 0.0
        self.written = 0
        self.spooled = 0
        self.last_error: str | None = None
        self.log = structlog.get_logger("tiffin.request_log")

    # --- the request path -----------------------------------------------------------------------

    def record(self, record: GenerationRequestRecord) -> None:
        """Queue one record; never waits. A full queue (the database far behind) spools it."""
        row = to_row(record)
        if len(self._queue) >= self.settings.queue_size:
            self._spool([row])
            return
        self._queue.append(row)
        self._arrived.set()

    def spool_now(self, record: GenerationRequestRecord) -> None:
        """Spool one record at once (no writer task running to drain a queue)."""
        self._spool([to_row(record)])

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="tiffin.request_log")

    async def close(self) -> None:
        """Stop the task, then write what is queued (to the spool if the database is down)."""
        if self._task is not None:
            self._closing = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            self._retry_at = 0.0
            interrupted, self._writing = self._writing, []
            await self._write(interrupted)
            while self._queue:
                await self._write(self._take())

    async def flush(self) -> None:
        """Write everything queued now, and replay the spool if the database answers."""
        async with self._lock:
            self._retry_at = 0.0
            await self._write(self._take())
            while self._queue:
                await self._write(self._take())

    @property
    def down(self) -> bool:
        """The last write failed (records are spooling)."""
        return self.last_error is not None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def describe(self) -> dict[str, Any]:
        return {
            "queued": self.pending,
            "written": self.written,
            "spooled": self.spooled,
            "spool_files": [str(path) for path in self.spool.files()],
            "spool_exists": self.spool.exists(),
            "last_error": self.last_error,
        }

    # --- the background task --------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            await self._wait_for_batch()
            async with self._lock:
                await self._write(self._take())

    async def _wait_for_batch(self) -> None:
        """Wait for a first record (at most retry_interval_s, so a spool is replayed while
        idle), then until batch_size records are queued or flush_interval_s has passed."""
        loop = asyncio.get_running_loop()
        if not self._queue:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), self.settings.retry_interval_s)
        deadline = loop.time() + self.settings.flush_interval_s
        while self._queue and len(self._queue) < self.settings.batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[dict[str, Any]]:
        """Up to batch_size records off the queue, kept in `_writing` until written."""
        size = max(1, self.settings.batch_size)
        self._writing = [self._queue.popleft() for _ in range(min(size, len(self._queue)))]
        return self._writing

    async def _write(self, batch: list[dict[str, Any]]) -> None:
        """Replay the spool, then insert `batch`; on failure spool it. Called under `_lock`.
        Cancelled midway, it leaves `_writing` for close() to write again."""
        await self._write_or_spool(batch)
        self._writing = []

    async def _write_or_spool(self, batch: list[dict[str, Any]]) -> None:
        if self._clock() < self._retry_at:
            self._spool(batch)
            return
        try:
            await self._replay()
            await self.store.insert(batch)
        except Exception as exc:
            self._spool(batch)
            self._retry_at = self._clock() + self.settings.retry_interval_s
            if self.last_error is None:
                self.log.warning("request log database unavailable; spooling", error=str(exc))
            self.last_error = str(exc)
            return
        self.written += len(batch)
        if self.last_error is not None:
            self.log.info("request log database back; spool replayed")
        self.last_error = None

    async def _replay(self) -> None:
        """Insert the spooled rows, in batches, file by file, removing each file once it is in.
        A failure leaves the file whole: the rows that did commit are skipped next time."""
        size = max(1, self.settings.batch_size)
        for path in self.spool.files():
            rows = self.spool.read(path)
            for start in range(0, len(rows), size):
                await self.store.insert(rows[start : start + size])
            path.unlink()
            self.written += len(rows)
            self.log.info("request log spool replayed", rows=len(rows), file=path.name)

    def _spool(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.spool.append(rows)
            self.spooled += len(rows)
