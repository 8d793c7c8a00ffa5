"""Finishes batches. Every process runs one; every `batch.poll_s` it looks at the batches that
are not final (one listing of `batches-active/`) and moves them on:

- in_progress with every line answered -> finalizing -> completed;
- past its completion window -> expired, with the lines not answered in the error file
  (`batch_expired`); cancelling -> cancelled, the same way (`batch_cancelled`);
- validating for longer than a minute (the process making it died) -> its lines queued again;
- with a queue that does not outlive the process (memory), the first look after a start queues
  again the lines of every unfinished batch that have no result.

Finishing is idempotent (file ids come from the batch id, lines are sorted), so two processes
finishing the same batch at once write the same files."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from runtime.batches.batch_input import BadLine, InputLine, read_lines
from runtime.batches.batch_records import FINAL, BatchRecord, BatchStatus, FileRecord, result_line
from runtime.batches.batch_store import BatchStore
from runtime.integrations.object_storage.object_stores import ObjectNotFound

if TYPE_CHECKING:
    from runtime.batches.batch_service import BatchService

STUCK_VALIDATING_S = 60.0
_UNANSWERED = {
    BatchStatus.expired: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    BatchStatus.cancelled: ("batch_cancelled", "The batch was cancelled before this request ran."),
}


class BatchSupervisor:
    def __init__(self, service: BatchService) -> None:
        self.service = service

    async def run(self) -> None:
        recover = True
        while True:
            store, queue = self.service.store(), self.service.queue()
            if store is not None and queue is not None:
                try:
                    await self.sweep(store, recover=recover and not queue.durable)
                    recover = False
                    self.service.runtime.metrics.batches.waiting.set(await queue.depth())
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.service.log.exception("batch supervisor sweep failed")
            await asyncio.sleep(self.service.settings.poll_s)

    async def sweep(self, store: BatchStore, *, recover: bool = False) -> None:
        for batch_id in await store.active():
            record = await store.batch(batch_id)
            if record is None or record.status in FINAL:
                await store.deactivate(batch_id)
                continue
            await self.step(store, record, recover=recover)

    async def step(self, store: BatchStore, record: BatchRecord, *, recover: bool) -> None:
        now = time.time()
        status = record.status
        if status is BatchStatus.validating:
            if now - record.created_at > STUCK_VALIDATING_S:
                await self._requeue(store, record, {})
                record.mark(BatchStatus.in_progress)
                await store.put_batch(record)
            return
        results = await store.result_keys(record.id)
        if status is BatchStatus.cancelling:
            if not self.service.worker.by_batch.get(record.id):
                await self.finish(store, record, BatchStatus.cancelled, results)
        elif status is BatchStatus.finalizing or len(results) >= record.total:
            await self.finish(store, record, BatchStatus.completed, results)
        elif now >= record.expires_at:
            await self.finish(store, record, BatchStatus.expired, results)
        elif recover:
            await self._requeue(store, record, results)

    async def _requeue(self, store: BatchStore, record: BatchRecord, done: dict[int, bool]) -> None:
        try:
            lines = await _input_lines(store, record)
        except (ObjectNotFound, BadLine) as exc:
            record.errors = [{"code": "missing_input", "message": str(exc), "line": None}]
            record.mark(BatchStatus.failed)
            await store.put_batch(record)
            await store.deactivate(record.id)
            await self.service.announce(record)
            return
        missing = [(i, line) for i, line in enumerate(lines) if i not in done]
        if missing:
            self.service.log.info("batch lines queued again", batch=record.id, lines=len(missing))
            await self.service.enqueue(record, missing)

    async def finish(
        self, store: BatchStore, record: BatchRecord, status: BatchStatus, results: dict[int, bool]
    ) -> None:
        """Write the output and error files and move the batch to `status`."""
        if status is BatchStatus.completed and record.status is not BatchStatus.finalizing:
            record.mark(BatchStatus.finalizing)
            await store.put_batch(record)
            await self.service.announce(record)
        output: list[bytes] = []
        errors: list[bytes] = []
        for index in sorted(results):
            line = await store.result(record.id, index, results[index])
            if line is not None:
                (output if results[index] else errors).append(_jsonl(line))
        unanswered = _UNANSWERED.get(status)
        if unanswered is not None and len(results) < record.total:
            await self._unanswered(store, record, results, unanswered, errors)
        record.completed = sum(results.values())
        record.failed = len(results) - record.completed
        if unanswered is not None:
            record.failed = record.total - record.completed
        record.output_file_id = await self._file(store, record, "output", output)
        record.error_file_id = await self._file(store, record, "error", errors)
        record.mark(status)
        await store.put_batch(record)
        await store.deactivate(record.id)
        await store.drop_results(record.id)
        self.service.runtime.metrics.batches.finished(status.value)
        await self.service.announce(record)

    async def _unanswered(
        self,
        store: BatchStore,
        record: BatchRecord,
        results: dict[int, bool],
        unanswered: tuple[str, str],
        errors: list[bytes],
    ) -> None:
        code, message = unanswered
        try:
            lines = await _input_lines(store, record)
        except (ObjectNotFound, BadLine):
            return
        for index, line in enumerate(lines):
            if index not in results:
                request_id = f"{record.id}-{index}"
                error = {"code": code, "message": message}
                errors.append(_jsonl(result_line(line.custom_id, request_id, None, None, error)))

    async def _file(
        self, store: BatchStore, record: BatchRecord, kind: str, lines: list[bytes]
    ) -> str | None:
        if not lines:
            return None
        file = FileRecord(
            id=f"file-{kind}-{record.id.removeprefix('batch_')}",
            owner=record.owner,
            bytes=sum(len(line) for line in lines),
            filename=f"{record.id}_{kind}.jsonl",
            purpose="batch_output",
        )
        await store.put_file(file, b"".join(lines))
        return file.id


async def _input_lines(store: BatchStore, record: BatchRecord) -> list[InputLine]:
    """The batch's requests, read again from its input file (checked when it was made)."""
    return read_lines(await store.file_content(record.input_file_id), 10**9)


def _jsonl(line: dict[str, Any]) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"
