"""The Batch API's machinery on one Runtime: where files and results live (the object_storage
integration), the queue lines travel on (the queue integration), the worker that runs lines
(batch_worker.py) and the supervisor that finishes batches (batch_supervisor.py). Both are
found by capability on every use, so an integration replaced by a live apply is picked up."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from runtime.batches.batch_input import InputLine
from runtime.batches.batch_records import FINAL, BatchLine, BatchRecord, BatchStatus
from runtime.batches.batch_store import BatchStore
from runtime.batches.batch_supervisor import BatchSupervisor
from runtime.batches.batch_worker import BatchWorker
from runtime.events import BusEvent
from runtime.integrations.capabilities import LineQueueProvider, ObjectStoreProvider
from runtime.integrations.queue.line_queue import LineQueue

if TYPE_CHECKING:
    from runtime.app import Runtime

# Events on the bus (and GraphQL's batch subscription) when a batch changes status.
BATCH_UPDATED = "batch.updated"


class BatchService:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.settings = runtime.settings.batch
        self.log = structlog.get_logger("tiffin.batch")
        self.worker = BatchWorker(self)
        self.supervisor = BatchSupervisor(self)
        self._tasks: list[asyncio.Task[None]] = []

    def store(self) -> BatchStore | None:
        for _, provider in self.runtime.integrations.providing(ObjectStoreProvider):
            store = provider.object_store()
            if store is not None:
                return BatchStore(store)
        return None

    def queue(self) -> LineQueue | None:
        for _, provider in self.runtime.integrations.providing(LineQueueProvider):
            queue = provider.line_queue()
            if queue is not None:
                return queue
        return None

    def route_for(self, endpoint: str) -> str | None:
        """The route a batch line for `endpoint` runs through: the one live POSTs reach."""
        for name, route in self.runtime.settings.handlers.routes.items():
            http = route.http
            if http is not None and http.method.upper() == "POST" and http.path == endpoint:
                return name
        return None

    async def start(self) -> None:
        """Both loops run even without a queue integration, waiting for one: a live apply may
        add it (they look for the store and the queue on every turn)."""
        if self.settings.concurrency > 0:
            self._tasks.append(asyncio.create_task(self.worker.run(), name="batch-worker"))
        self._tasks.append(asyncio.create_task(self.supervisor.run(), name="batch-supervisor"))

    async def stop(self) -> None:
        """Stop taking lines; lines still running are cancelled, unacked, and so run again
        (by another process, or this one after a restart)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.worker.stop()

    async def submit(self, record: BatchRecord, lines: list[InputLine]) -> None:
        """Queue every line of a new batch and mark it in progress. The record is written
        (validating) and marked active first, so a process dying midway leaves a batch the
        supervisor finishes queueing (results are idempotent, so lines queued twice are
        answered once)."""
        store, queue = self._both()
        await store.put_batch(record)
        await store.activate(record.id)
        await self.enqueue(record, list(enumerate(lines)), queue)
        record.mark(BatchStatus.in_progress)
        await store.put_batch(record)
        await self.announce(record)

    async def enqueue(
        self,
        record: BatchRecord,
        lines: list[tuple[int, InputLine]],
        queue: LineQueue | None = None,
    ) -> None:
        """Queue `lines` (each with its index among the batch's requests)."""
        queue = queue or self._both()[1]
        messages = [
            BatchLine(record.id, index, line.custom_id, line.body, record.expires_at).to_json()
            for index, line in lines
        ]
        for start in range(0, len(messages), 500):
            await queue.put(messages[start : start + 500])
        self.runtime.metrics.batches.queued(len(messages))

    async def announce(self, record: BatchRecord) -> None:
        shown = record.shown()
        await self.runtime.events.publish(BusEvent(BATCH_UPDATED, "batches", {"batch": shown}))

    async def counts(self, store: BatchStore, record: BatchRecord) -> tuple[int, int]:
        """Lines answered so far (2xx, other), read from the results while it runs."""
        if record.status in FINAL or record.status is BatchStatus.validating:
            return record.completed, record.failed  # kept on the record when it ended
        results = await store.result_keys(record.id)
        ok = sum(results.values())
        return ok, len(results) - ok

    def _both(self) -> tuple[BatchStore, LineQueue]:
        store, queue = self.store(), self.queue()
        if store is None or queue is None:
            raise RuntimeError("the object_storage and queue integrations are not running")
        return store, queue

    def lonely_queue_warning(self) -> str | None:
        """Several workers on the in-process queue: each runs only the batches it took."""
        if self.runtime.settings.server.workers <= 1:
            return None
        queues = self.runtime.integrations.providing(LineQueueProvider)
        if not any(getattr(queue, "backend", "") == "memory" for _, queue in queues):
            return None
        return (
            "server.workers > 1 with the in-process batch queue: each worker runs only the"
            " batches made through it, and a restart re-queues every unfinished batch on every"
            " worker; select integrations=redis or set AMQP_URL for one shared queue"
        )
