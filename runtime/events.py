"""In-process async event bus: integrations and the runtime publish, anyone subscribes.

Subscribers give a glob pattern (`integration.*`) and a callback (sync or async), or open a
stream (`async with bus.stream("integration.*") as events`). A failing subscriber is logged and
never breaks the publisher. With the redis integration up, a bridge
(runtime/integrations/redis/redis_bridge.py) carries events between the buses of every worker and
replica: events it delivers here from another process carry that process's `origin`, and those
are never sent on again.
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog

Subscriber = Callable[["BusEvent"], Awaitable[None] | None]


@dataclass(frozen=True)
class BusEvent:
    """Something that happened: `type` is dotted (`integration.started`), `source` who said it.
    `origin` is empty for an event of this process, and names the process (worker or replica)
    an event came from when the Redis bridge delivered it."""

    type: str
    source: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    origin: str = ""

    @property
    def remote(self) -> bool:
        """Delivered from another process: per-process state (metrics) must not count it."""
        return bool(self.origin)

    def to_dict(self) -> dict[str, Any]:
        described = {
            "type": self.type,
            "source": self.source,
            "data": dict(self.data),
            "time": self.time,
        }
        if self.origin:
            described["origin"] = self.origin
        return described


class EventBus:
    """Fan-out of BusEvents to pattern subscribers; keeps the last `history` events for status."""

    def __init__(self, history: int = 256) -> None:
        self._subscribers: list[tuple[str, Subscriber]] = []
        self.recent: deque[BusEvent] = deque(maxlen=history)
        self._log = structlog.get_logger("tiffin.events")

    def subscribe(self, pattern: str, callback: Subscriber) -> Callable[[], None]:
        """Call `callback` for every event whose type matches `pattern`; returns an unsubscribe."""
        entry = (pattern, callback)
        self._subscribers.append(entry)

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    async def publish(self, event: BusEvent) -> None:
        self.recent.append(event)
        for pattern, callback in list(self._subscribers):
            if not fnmatch.fnmatchcase(event.type, pattern):
                continue
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self._log.exception("event subscriber failed", event_type=event.type)

    @asynccontextmanager
    async def stream(
        self, pattern: str = "*", maxsize: int = 1000
    ) -> AsyncIterator[AsyncIterator[BusEvent]]:
        """Subscribe for the duration of the block; iterate to receive events in order.

        A slow reader loses the oldest events rather than blocking publishers.
        """
        queue: asyncio.Queue[BusEvent] = asyncio.Queue(maxsize=maxsize)

        def enqueue(event: BusEvent) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

        unsubscribe = self.subscribe(pattern, enqueue)

        async def iterate() -> AsyncIterator[BusEvent]:
            while True:
                yield await queue.get()

        try:
            yield iterate()
        finally:
            unsubscribe()
