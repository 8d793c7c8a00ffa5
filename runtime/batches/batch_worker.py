"""The batch worker of one process: takes lines from the queue, runs each through the same
route (handler, hooks, metrics, request log, cost, per-key usage) as a live request of its
endpoint, as the batch's owner, stores its result, then acks it.

Live traffic first: a line starts on a model only while the model has a slot no live request
waits for (`in_flight < slots`) and batch lines hold fewer than `batch.max_share` of its slots,
so a live request arriving finds a free slot. A model that has seen no live request for
`batch.idle_s` lends batch lines every slot; the first live request back takes the first slot a
line gives back, and from then on the share holds again."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from typing import TYPE_CHECKING, Any

from runtime.auth.keys import Principal
from runtime.batches.batch_records import FINAL, BatchLine, BatchRecord, BatchStatus, result_line
from runtime.batches.batch_store import BatchStore
from runtime.integrations.queue.line_queue import Delivery, LineQueue
from runtime.types import Event, HandlerError, Reply, close

if TYPE_CHECKING:
    from runtime.batches.batch_service import BatchService
    from runtime.models import ServedModel

TRANSPORT = "batch"  # Event.transport of a batch line: metrics and logs tell them apart
_GATE_POLL_S = 0.02
_RECORD_TTL_S = 1.0


class BatchWorker:
    def __init__(self, service: BatchService) -> None:
        self.service = service
        self.settings = service.settings
        self.running: dict[str, int] = {}  # model id -> batch lines running on it here
        self.by_batch: dict[str, int] = {}  # batch id -> lines running here
        self._records: dict[str, tuple[float, BatchRecord | None]] = {}
        self._lines: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Condition()  # notified when a line here gives its slot back

    async def run(self) -> None:
        slots = asyncio.Semaphore(self.settings.concurrency)
        dispatcher = self.service.runtime.dispatcher
        while True:
            store, queue = self.service.store(), self.service.queue()
            if store is None or queue is None or dispatcher.draining:
                await asyncio.sleep(1.0)
                continue
            await slots.acquire()
            try:
                delivery = await queue.take(block_s=1.0)
            except asyncio.CancelledError:
                slots.release()
                raise
            except Exception as exc:  # the queue is down: its health check says so
                slots.release()
                self.service.log.warning("batch queue unavailable", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            if delivery is None:
                slots.release()
                continue
            task = asyncio.create_task(self._handle(store, queue, delivery))
            self._lines.add(task)
            task.add_done_callback(self._lines.discard)
            task.add_done_callback(lambda _: slots.release())

    async def stop(self) -> None:
        for task in list(self._lines):
            task.cancel()
        for task in list(self._lines):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _handle(self, store: BatchStore, queue: LineQueue, delivery: Delivery) -> None:
        log = self.service.log
        try:
            line = BatchLine.from_json(delivery.message)
        except (TypeError, KeyError):
            log.error("batch message is not a line; dropped")
            await queue.ack(delivery)
            return
        record = await self._record(store, line.batch_id)
        skip = (
            record is None
            or record.status in FINAL
            or record.status is BatchStatus.cancelling
            or time.time() >= line.expires_at
        )
        if skip or await store.has_result(line.batch_id, line.index):
            await queue.ack(delivery)  # gone, over, or answered already (a redelivery)
            return
        if delivery.redelivered:
            log.info("batch line delivered again", batch=line.batch_id, line=line.index)
        assert record is not None
        self.by_batch[record.id] = self.by_batch.get(record.id, 0) + 1
        metrics = self.service.runtime.metrics
        try:
            model_id = await self._admitted(line.body.get("model"))
            metrics.batches.line_running(1)
            try:
                status, body, request_id = await self._run(record, line)
            finally:
                metrics.batches.line_running(-1)
                if model_id:
                    self.running[model_id] -= 1
                    async with self._freed:
                        self._freed.notify_all()
            ok = 200 <= status < 300
            answer = result_line(line.custom_id, request_id, status, body)
            await store.put_result(line.batch_id, line.index, ok, answer)
            await queue.ack(delivery)  # only once the result is stored
            metrics.batches.line_answered(ok)
        finally:
            self.by_batch[record.id] -= 1
            if not self.by_batch[record.id]:
                del self.by_batch[record.id]

    async def _admitted(self, model_id: Any) -> str | None:
        """Wait for a slot on the line's model that live traffic leaves free."""
        models = self.service.runtime.models
        if not isinstance(model_id, str):
            return None
        try:
            model = models.get(model_id)
        except Exception:  # unknown: the handler answers 404
            return None
        key = model.id
        while True:
            model = models.models.get(key, model)
            if self.running.get(key, 0) < self._cap(model) and model.in_flight < model.slots:
                self.running[key] = self.running.get(key, 0) + 1
                return key
            # Woken when a line here ends; a live request ending is seen at the next look.
            async with self._freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), _GATE_POLL_S)

    def _cap(self, model: ServedModel) -> int:
        """How many lines may run on `model` now: max_share of its slots while live requests
        use it (one held it within idle_s), every slot once it has been idle that long."""
        idle_s = self.settings.idle_s
        live = model.in_flight > model.background
        lent = idle_s > 0 and not live and time.monotonic() - model.live_at >= idle_s
        share = 1.0 if lent else self.settings.max_share
        return max(1, math.floor(model.slots * share))

    async def _run(self, record: BatchRecord, line: BatchLine) -> tuple[int, Any, str]:
        """The line as a request to its endpoint's route: (status, body, request id)."""
        runtime = self.service.runtime
        request_id = uuid.uuid4().hex
        route = self.service.route_for(record.endpoint)
        if route is None:
            error = HandlerError(404, f"no route serves POST {record.endpoint} here")
            return error.status, error.to_dict(), request_id
        event = Event(body=dict(line.body), transport=TRANSPORT, route=route, request_id=request_id)
        if record.scopes:  # made with an API key: its lines run as that key
            event.principal = Principal(record.owner, frozenset(record.scopes))
        dispatcher = runtime.dispatcher
        ctx = dispatcher.context(event)
        ctx.background = True  # decoded behind live sequences by a batching engine
        try:
            result = await dispatcher.dispatch(route, event, ctx)
        except HandlerError as exc:
            return exc.status, exc.to_dict(), request_id
        except Exception:
            self.service.log.exception("batch line failed", batch=record.id, line=line.index)
            error = HandlerError(500, "internal server error", type="server_error")
            return 500, error.to_dict(), request_id
        if isinstance(result, Reply):
            return result.status, result.body, request_id
        if hasattr(result, "__aiter__"):  # a stream (never asked for): not an answer
            await close(result)
            error = HandlerError(500, "the handler streamed its answer", type="server_error")
            return 500, error.to_dict(), request_id
        return 200, result, request_id

    async def _record(self, store: BatchStore, batch_id: str) -> BatchRecord | None:
        now = time.monotonic()
        cached = self._records.get(batch_id)
        if cached is not None and now - cached[0] < _RECORD_TTL_S:
            return cached[1]
        record = await store.batch(batch_id)
        self._records[batch_id] = (now, record)
        if len(self._records) > 256:
            self._records = {k: v for k, v in self._records.items() if now - v[0] < _RECORD_TTL_S}
        return record
