"""Batch lines on a Redis Stream read through a consumer group: every worker and replica is a
consumer of the same group, so each line goes to one of them. A message stays pending until
its consumer acks it (XACK, then XDEL); one left pending longer than `redeliver_after_s` (its
consumer died) is claimed by another consumer (XAUTOCLAIM) and run again. A live consumer
touches the messages it holds (XCLAIM to itself, which resets their idle time) every third of
that time, so a slow line is never taken from a worker that is still running it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from runtime.integrations.queue.line_queue import Delivery


class RedisStreamQueue:
    durable = True

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        *,
        redeliver_after_s: float,
        socket_timeout_s: float = 5.0,
    ) -> None:
        self.stream = stream
        self.group = group
        self.redeliver_after_ms = int(redeliver_after_s * 1000)
        # Unique per process: a restarted worker is a new consumer, and claims what its
        # predecessor left pending once that has idled long enough.
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.socket_timeout_s = socket_timeout_s
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._ready = False
        self._next_claim = 0.0
        self._held: set[Any] = set()  # entry ids taken and not acked yet
        self._heartbeat: asyncio.Task[None] | None = None

    async def _group(self) -> None:
        if self._ready:
            return
        try:
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def put(self, messages: Sequence[dict[str, Any]]) -> None:
        await self._group()
        async with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.xadd(self.stream, {"m": json.dumps(message)})
            await pipe.execute()

    async def take(self, block_s: float) -> Delivery | None:
        await self._group()
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._touch_held(), name="batch-queue-touch")
        now = time.monotonic()
        if now >= self._next_claim:
            claimed = await self.client.xautoclaim(
                self.stream, self.group, self.consumer, self.redeliver_after_ms, "0-0", count=1
            )
            entries: list[Any] = list(claimed[1]) if claimed else []
            if entries:
                return self._delivery(entries[0], redelivered=True)
            self._next_claim = now + 1.0  # look for abandoned messages about once a second
        block_ms = int(min(block_s, max(0.1, self.socket_timeout_s - 0.5)) * 1000)
        read: Any = await self.client.xreadgroup(
            self.group, self.consumer, {self.stream: ">"}, count=1, block=block_ms
        )
        for _, new in read or []:
            for entry in new:
                return self._delivery(entry, redelivered=False)
        return None

    def _delivery(self, entry: Any, *, redelivered: bool) -> Delivery:
        entry_id, fields = entry
        raw = fields.get(b"m") or fields.get("m") or b"{}"
        self._held.add(entry_id)
        return Delivery(json.loads(raw), tag=entry_id, redelivered=redelivered)

    async def _touch_held(self) -> None:
        """Keep what this consumer holds its own while it runs (see the module's docstring)."""
        while True:
            await asyncio.sleep(self.redeliver_after_ms / 3000)
            held = list(self._held)
            if not held:
                continue
            with contextlib.suppress(Exception):  # Redis down: the health check says so
                await self.client.xclaim(
                    self.stream, self.group, self.consumer, 0, held, justid=True
                )

    async def ack(self, delivery: Delivery) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, delivery.tag)
            pipe.xdel(self.stream, delivery.tag)
            await pipe.execute()
        self._held.discard(delivery.tag)

    async def depth(self) -> int:
        await self._group()
        for group in await self.client.xinfo_groups(self.stream):
            name = group.get("name")
            if name in (self.group, self.group.encode()):
                lag = group.get("lag")
                if lag is not None:
                    return int(lag)
        return int(await self.client.xlen(self.stream))

    async def check(self) -> str:
        await self.client.ping()
        await self._group()
        return f"Redis stream {self.stream}, group {self.group}"

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.client.aclose()
