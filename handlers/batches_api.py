"""OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{batch_id}` and
`POST /v1/batches/{batch_id}/cancel`. A batch's lines are queued (the queue integration) and run
by the batch workers of every process at a lower priority than live requests; its output and
error files are Files (files_api.py). A key sees and cancels only its own batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from handlers.files_api import page, store_of, visible
from handlers.parsing import parse
from hooks.request_limits import client_of
from runtime.batches.batch_input import BadLine, read_lines
from runtime.batches.batch_records import (
    ENDPOINTS,
    FINAL,
    WINDOWS,
    BatchRecord,
    BatchStatus,
    new_id,
)
from runtime.batches.batch_store import BatchStore
from runtime.dispatch import Context, request_body
from runtime.events import BusEvent
from runtime.types import Event, HandlerError


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def _queue_ready(ctx: Context) -> None:
    if ctx.runtime.batches.queue() is None:
        raise HandlerError(
            503,
            "batches need the queue integration running (integrations=queue)",
            type="server_error",
            code="queue_unavailable",
        )


@request_body(BatchRequest)
async def create(event: Event, ctx: Context) -> dict[str, Any]:
    body = parse(BatchRequest, event.body)
    batches = ctx.runtime.batches
    if body.endpoint not in ENDPOINTS or batches.route_for(body.endpoint) is None:
        served = [e for e in ENDPOINTS if batches.route_for(e) is not None]
        raise HandlerError(
            400,
            f"endpoint {body.endpoint!r} is not one of {', '.join(served)}",
            param="endpoint",
        )
    windows = ctx.runtime.settings.batch.completion_windows
    if body.completion_window not in windows or body.completion_window not in WINDOWS:
        raise HandlerError(
            400,
            f"completion_window {body.completion_window!r} is not one of {', '.join(windows)}",
            param="completion_window",
        )
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise HandlerError(
                400, "metadata keys are at most 64 characters, values 512", param="metadata"
            )
    store = store_of(ctx)
    _queue_ready(ctx)
    file = await store.file(body.input_file_id)
    if file is None or not visible(ctx, file.owner):
        raise HandlerError(
            404, f"no file {body.input_file_id!r}", param="input_file_id", code="file_not_found"
        )
    if file.purpose != "batch":
        raise HandlerError(
            400,
            f"file {file.id!r} has purpose {file.purpose!r}, not 'batch'",
            param="input_file_id",
        )
    principal = ctx.principal
    record = BatchRecord(
        id=new_id("batch_"),
        owner=client_of(ctx),
        scopes=sorted(getattr(principal, "scopes", ())) if principal is not None else [],
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        metadata=body.metadata,
    )
    record.expires_at = record.created_at + WINDOWS[body.completion_window]
    try:
        lines = read_lines(await store.file_content(file.id), ctx.runtime.settings.batch.max_lines)
    except BadLine as exc:
        return await _failed(store, record, [_error("invalid_line", exc.reason, exc.number)])
    wrong = [
        _error("mismatched_url", f"url {line.url!r} is not the batch's endpoint", line.number)
        for line in lines
        if line.url != body.endpoint
    ]
    if wrong:
        return await _failed(store, record, wrong)
    record.total = len(lines)
    await ctx.runtime.batches.submit(record, lines)
    return record.shown()


def _error(code: str, message: str, line: int | None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


async def _failed(
    store: BatchStore, record: BatchRecord, errors: list[dict[str, Any]]
) -> dict[str, Any]:
    """OpenAI's answer to an input that does not validate: the batch, `failed`, with one error
    per bad line."""
    record.errors = errors[:100]
    record.mark(BatchStatus.failed)
    await store.put_batch(record)
    return record.shown()


async def list_batches(event: Event, ctx: Context) -> dict[str, Any]:
    store = store_of(ctx)
    batches = [b for b in await store.batches() if visible(ctx, b.owner)]
    batches.sort(key=lambda b: (b.created_at, b.id))
    listed = page(event, batches, lambda b: b.id, default_limit=20)
    shown = {b.id: b for b in batches}
    listed["data"] = [await _shown(ctx, store, shown[item["id"]]) for item in listed["data"]]
    return listed


async def _own(event: Event, ctx: Context) -> tuple[BatchStore, BatchRecord]:
    batch_id = event.path_params.get("batch_id", "")
    store = store_of(ctx)
    record = await store.batch(batch_id)
    if record is None or not visible(ctx, record.owner):
        raise HandlerError(404, f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
    return store, record


async def _shown(ctx: Context, store: BatchStore, record: BatchRecord) -> dict[str, Any]:
    completed, failed = await ctx.runtime.batches.counts(store, record)
    return record.shown(completed, failed)


async def get(event: Event, ctx: Context) -> dict[str, Any]:
    store, record = await _own(event, ctx)
    return await _shown(ctx, store, record)


async def cancel(event: Event, ctx: Context) -> dict[str, Any]:
    """Lines not yet run are not run; the batch becomes `cancelled` once the lines running
    here finish, with every line not answered in its error file."""
    store, record = await _own(event, ctx)
    if record.status in FINAL or record.status is BatchStatus.finalizing:
        raise HandlerError(
            409,
            f"batch {record.id!r} is {record.status.value} and cannot be cancelled",
            param="batch_id",
            code="batch_not_cancellable",
        )
    if record.status is not BatchStatus.cancelling:
        record.mark(BatchStatus.cancelling)
        await store.put_batch(record)
        await ctx.runtime.batches.announce(record)
    return await _shown(ctx, store, record)


async def watch(event: Event, ctx: Context) -> AsyncIterator[dict[str, Any]]:
    """A batch now, then each time its status or request counts change, until it is final:
    woken by `batch.updated` events, and every `interval` seconds (default 1) for counts."""
    batch_id = event.query.get("batch_id", "")
    interval_text = event.query.get("interval", "1")
    try:
        interval = float(interval_text)
    except ValueError:
        interval = 0.0
    if not 0.05 <= interval <= 60:
        raise HandlerError(400, "interval must be from 0.05 to 60 seconds", param="interval")
    store, record = await _own(Event(path_params={"batch_id": batch_id}), ctx)
    changed = asyncio.Event()

    def on_update(bus_event: BusEvent) -> None:
        if bus_event.data.get("batch", {}).get("id") == batch_id:
            changed.set()

    unsubscribe = ctx.events.subscribe("batch.updated", on_update)
    ctx.closers.append(_async(unsubscribe))
    return _updates(ctx, store, record, changed, interval)


def _async(call: Any) -> Any:
    async def run() -> None:
        call()

    return run


async def _updates(
    ctx: Context, store: BatchStore, record: BatchRecord, changed: asyncio.Event, interval: float
) -> AsyncIterator[dict[str, Any]]:
    last: Any = None
    while True:
        shown = await _shown(ctx, store, record)
        key = (shown["status"], tuple(shown["request_counts"].values()))
        if key != last:
            last = key
            yield shown
        if record.status in FINAL or ctx.draining.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), interval)
        changed.clear()
        record = await store.batch(record.id) or record
