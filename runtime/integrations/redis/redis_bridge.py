"""The event bridge: the buses of every worker and replica joined through one Redis Stream.

Out: events published on this process's bus whose type matches `patterns` are queued (the
publisher never waits on Redis) and XADDed in batches to `stream`, trimmed with `MAXLEN ~`,
each entry tagged with this process's `origin`. In: a blocking XREAD follows the stream from
where it stood when the bridge started, and republishes the entries of other origins on the
local bus with `origin` set. Entries of this origin are skipped and events that carry an origin
are never sent out again, so nothing echoes or loops.

While Redis is down, events go on flowing on the local bus and are not queued for later (a
stale "model loaded" is worse than none); the reader resumes after the last entry it delivered,
so entries that other processes added meanwhile still arrive.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from runtime.events import BusEvent, EventBus
from runtime.integrations.redis.redis_link import RedisLink, cancel_until_done

BATCH = 100


class EventBridge:
    """Carries matching events between this process's bus and the stream, both ways."""

    def __init__(
        self,
        link: RedisLink,
        bus: EventBus,
        *,
        stream: str,
        origin: str,
        patterns: Sequence[str],
        maxlen: int,
        queue_size: int = 1000,
    ) -> None:
        self.link = link
        self.bus = bus
        self.stream = stream
        self.origin = origin
        self.patterns = tuple(patterns)
        self.maxlen = maxlen
        self.last_id = "0-0"
        self.sent = self.received = self.dropped = self.malformed = 0
        self.lag_s: float | None = None  # publish-to-delivery time of the last event received
        self._queue: asyncio.Queue[BusEvent] = asyncio.Queue(maxsize=queue_size)
        self._unsubscribe: Callable[[], None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Note where the stream stands now (events from here on are delivered), then listen."""
        newest = await self.link.commands.xrevrange(self.stream, count=1)
        self.last_id = str(newest[0][0]) if newest else "0-0"
        if self._unsubscribe is None:
            self._unsubscribe = self.bus.subscribe("*", self._outgoing)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="tiffin:redis-bridge-send"
            )

    async def stop(self, within: float = 2.0) -> None:
        """Stop listening and sending; events still queued are not sent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._sender is not None:
            await cancel_until_done(self._sender, within)
            self._sender = None

    # --- out ------------------------------------------------------------------------------------

    def crosses(self, event: BusEvent) -> bool:
        """Whether `event` is sent to the other processes."""
        if event.origin:  # delivered from another process: never sent on
            return False
        return any(fnmatch.fnmatchcase(event.type, p) for p in self.patterns)

    def _outgoing(self, event: BusEvent) -> None:
        if not self.crosses(event):
            return
        if not self.link.up:
            self.dropped += 1
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(event)

    async def _send_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if not self.link.up:
                self.dropped += len(batch)
                continue
            try:
                async with self.link.commands.pipeline(transaction=False) as pipe:
                    for event in batch:
                        pipe.xadd(
                            self.stream,
                            {"origin": self.origin, "event": _encode(event)},
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.failed(exc)
                self.dropped += len(batch)
                continue
            self.sent += len(batch)

    # --- in -------------------------------------------------------------------------------------

    async def read_once(self) -> None:
        """Wait up to the link's block time for new entries and deliver those of other
        origins. Raises when Redis is unreachable (the caller marks the link down)."""
        block_ms = max(int(self.link.block_s * 1000), 1)
        streams: dict[Any, Any] = {self.stream: self.last_id}
        found: Any = await self.link.reads.xread(streams, count=BATCH, block=block_ms)
        for _stream, entries in found or ():
            for entry_id, fields in entries:
                self.last_id = str(entry_id)
                if fields.get("origin") == self.origin:
                    continue
                event = self._decode(fields)
                if event is not None:
                    self.received += 1
                    self.lag_s = max(time.time() - event.time, 0.0)
                    await self.bus.publish(event)

    def _decode(self, fields: dict[str, Any]) -> BusEvent | None:
        try:
            raw = json.loads(fields["event"])
            return BusEvent(
                type=str(raw["type"]),
                source=str(raw["source"]),
                data=dict(raw.get("data") or {}),
                time=float(raw["time"]),
                origin=str(fields["origin"]),
            )
        except (KeyError, TypeError, ValueError):
            self.malformed += 1  # not ours to act on (another tool writing the stream)
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "origin": self.origin,
            "events": list(self.patterns),
            "last_id": self.last_id,
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "malformed": self.malformed,
            "queued": self._queue.qsize(),
            "lag_s": None if self.lag_s is None else round(self.lag_s, 4),
        }


def _encode(event: BusEvent) -> str:
    body: dict[str, Any] = {"type": event.type, "source": event.source, "time": event.time}
    body["data"] = dict(event.data)
    return json.dumps(body, default=str, separators=(",", ":"))
