"""What a person watching the server sees live, on any transport: the metrics snapshot (once,
or every `interval` seconds), the event stream of models and integrations, and the recent
generation requests. Handlers of the route table like any other: `/ws/metrics` and GraphQL's
`metrics` subscription are the same `metrics.watch`."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from runtime.dispatch import Context
from runtime.events import BusEvent
from runtime.integrations import IntegrationUnavailable
from runtime.integrations.database import DatabaseIntegration
from runtime.secrets import redact_text
from runtime.telemetry.batching import slot_fields
from runtime.telemetry.live_stats import GenerationRequestRecord
from runtime.types import Event, HandlerError

RECORD_FIELDS = [name for name in GenerationRequestRecord.__dataclass_fields__ if name != "id"]
DEFAULT_EVENTS = ("model.*", "integration.*", "*.pull", "alert.*", "grafana.*", "config.*")
# Never shown, whatever `types` asks: `reconfigure.share` carries a whole config between workers.
PRIVATE_EVENTS = ("reconfigure.*",)


def number(query: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    """A numeric query parameter within [low, high]; anything else is a 400 naming it."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise HandlerError(400, f"{name} must be a number", param=name) from None
    if not low <= value <= high:
        raise HandlerError(400, f"{name} must be between {low:g} and {high:g}", param=name)
    return value


def _models(ctx: Context) -> list[dict[str, Any]]:
    found = []
    for model in ctx.models.describe_all():
        stats = model.get("stats") or {}
        queued = stats.get("queued") if isinstance(stats, dict) else None
        found.append(
            {
                "id": model["id"],
                "provider": model["provider"],
                "state": model["state"],
                "in_flight": model["in_flight"],
                "queue_depth": int(queued) if queued is not None else 0,
                # A batching engine's slots and sequences; None for the other engines.
                **slot_fields(stats),
            }
        )
    return found


def _snapshot(ctx: Context, event: Event) -> dict[str, Any]:
    window = number(event.query, "window", 60.0, 1.0, 3600.0)
    return dict(ctx.runtime.live.snapshot(_models(ctx), window_s=window))


async def snapshot(event: Event, ctx: Context) -> dict[str, Any]:
    """Requests, tokens/s, latency percentiles, in flight, queue depth, per model (with a
    batching engine's slots busy and free, sequences running and requests waiting), over the
    last `window` seconds (default 60) of this worker."""
    return _snapshot(ctx, event)


async def watch(event: Event, ctx: Context) -> AsyncIterator[dict[str, Any]]:
    """A snapshot now and then every `interval` seconds (default 1, 0.1 to 60)."""
    interval = number(event.query, "interval", 1.0, 0.1, 60.0)
    _snapshot(ctx, event)  # bad parameters are a 400 before the stream starts

    async def frames() -> AsyncIterator[dict[str, Any]]:
        while not ctx.cancelled.is_set() and not ctx.draining.is_set():
            yield _snapshot(ctx, event)
            with contextlib.suppress(TimeoutError):  # a shutdown ends the feed at once
                await asyncio.wait_for(ctx.draining.wait(), interval)

    return frames()


async def events(event: Event, ctx: Context) -> AsyncIterator[dict[str, Any]]:
    """Events as they happen: model loads and unloads, integration status changes, pulls with
    progress, alerts. `types` picks them (comma-separated globs). With `initial=true` the
    stream starts with each model's current state as a `model.status` event."""
    raw = str(event.query.get("types") or "")
    patterns = tuple(p.strip() for p in raw.split(",") if p.strip()) or DEFAULT_EVENTS
    initial = str(event.query.get("initial", "")).lower() in ("1", "true", "yes")
    watcher = EventWatch(ctx, patterns, initial)
    ctx.closers.append(watcher.aclose)  # unsubscribed when the request ends, however it ends
    return watcher


class EventWatch:
    """Subscribed from the moment the handler returns (nothing between is missed); a slow
    reader loses the oldest events, never grows memory. Closing it unsubscribes."""

    def __init__(self, ctx: Context, patterns: tuple[str, ...], initial: bool) -> None:
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._ctx = ctx
        if initial:
            for model in _models(ctx):
                data = {"model": model["id"], "provider": model["provider"], **model}
                self._put(BusEvent("model.status", "models", data).to_dict())
        self._unsubscribe: Callable[[], None] | None = ctx.events.subscribe(
            "*", self._on_event(patterns)
        )

    def _on_event(self, patterns: tuple[str, ...]) -> Callable[[BusEvent], None]:
        def on_event(bus_event: BusEvent) -> None:
            if any(fnmatch.fnmatchcase(bus_event.type, p) for p in PRIVATE_EVENTS):
                return
            if any(fnmatch.fnmatchcase(bus_event.type, p) for p in patterns):
                self._put(bus_event.to_dict())

        return on_event

    def _put(self, item: dict[str, Any]) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def __aiter__(self) -> EventWatch:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._unsubscribe is None or self._ctx.draining.is_set():
            raise StopAsyncIteration
        if not self._queue.empty():
            return self._queue.get_nowait()
        # Wait for an event or for a shutdown, which ends the feed (a drain does not wait).
        item = asyncio.ensure_future(self._queue.get())
        draining = asyncio.ensure_future(self._ctx.draining.wait())
        try:
            await asyncio.wait({item, draining}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            draining.cancel()
            if not item.done():
                item.cancel()
        if item.done() and not item.cancelled():
            return item.result()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None


async def recent_requests(event: Event, ctx: Context) -> list[dict[str, Any]]:
    """The latest generation requests, newest first (`limit`, default 20): every worker's, from
    the request log, when the database integration is running; else this worker's, from memory
    (and from memory too while the database cannot answer)."""
    limit = int(number(event.query, "limit", 20, 0, 1000))
    try:
        database: DatabaseIntegration | None = ctx.integrations.require(
            "database", DatabaseIntegration
        )
    except IntegrationUnavailable:
        database = None
    # While the writer is spooling the database is down: no connect timeout to wait out.
    if database is not None and not database.writer.down and limit > 0:
        try:
            await database.writer.flush()  # what was just served is listed
            return [as_record(row) for row in await database.store.rows(limit)]
        except Exception as exc:
            ctx.log.warning(
                "request log unreadable; listing this worker's", error=redact_text(str(exc))
            )
    return list(ctx.runtime.live.recent(limit))


def as_record(row: dict[str, Any]) -> dict[str, Any]:
    """A request-log row in GenerationRequestRecord's shape."""
    reasons = str(row.get("finish_reasons") or "")
    fields = {name: row.get(name) for name in RECORD_FIELDS}
    return {
        **fields,
        "id": row["request_id"],
        "finish_reasons": reasons.split(",") if reasons else [],
    }
