"""The connections to one Redis and whether it is reachable now, shared by the event bridge and
the rate-limit counters of the redis integration.

Every call has a short socket timeout and no client-side retry, so a Redis that is down or hangs
costs a request at most `socket_timeout_s` once: the first failure marks the link down, and from
then on callers use their per-process fallback without touching the network until a ping (the
integration's watch loop) finds Redis again. Each transition is logged once, never with the
URL's password.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from runtime.secrets import redact_text

# How often a task that must stop is cancelled again, in case redis-py lost the cancel.
RECANCEL_EVERY_S = 0.05


async def cancel_until_done(task: asyncio.Task[None], within: float) -> bool:
    """Cancel `task` and wait for it to end, cancelling again until it does, for at most
    `within` seconds; True if it ended.

    One cancel is not enough: on Python 3.11, redis-py sends every command through
    `asyncio.wait_for`, which drops a cancel that lands just as the send completes (CPython
    gh-86296), and the task goes on as if never cancelled. A stop that awaited it would then
    wait forever (or for the manager's 30 s shutdown limit), and the task would outlive it.
    Tasks stopped this way also check a stop flag of their own between calls."""
    deadline = time.monotonic() + within
    while not task.done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(RECANCEL_EVERY_S, remaining))
    if not task.cancelled():
        task.exception()  # retrieved: a failure on the way out does not hold up the stop
    return True


class RedisLink:
    """Two clients on one URL (commands; blocking stream reads, whose socket timeout must
    outlast the block) and the up/down state that every user of them consults."""

    def __init__(self, url: str, *, socket_timeout_s: float, block_s: float, log: Any) -> None:
        self.url = url
        self.socket_timeout_s = socket_timeout_s
        self.block_s = block_s
        self.log = log if log is not None else structlog.get_logger("tiffin.redis")
        self._commands: Redis | None = None
        self._reads: Redis | None = None
        self.up = False
        self.last_error: str | None = None
        self.changed_at: float | None = None
        self.outages = 0
        self.errors = 0  # errors Redis answered with (the link stays up)

    def open(self) -> None:
        """Build the clients (no I/O: redis-py connects on the first command)."""
        if self._commands is None:
            self._commands = self._client(self.socket_timeout_s)
            self._reads = self._client(self.block_s + self.socket_timeout_s)

    def _client(self, socket_timeout_s: float) -> Redis:
        return Redis.from_url(
            self.url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    @property
    def commands(self) -> Redis:
        if self._commands is None:
            raise RuntimeError("the redis integration is not initialized")
        return self._commands

    @property
    def reads(self) -> Redis:
        if self._reads is None:
            raise RuntimeError("the redis integration is not initialized")
        return self._reads

    async def ping(self) -> float:
        """Round trip to Redis in seconds; raises when it is unreachable."""
        started = time.perf_counter()
        await self.commands.ping()
        return time.perf_counter() - started

    def restored(self) -> None:
        """Redis answered: shared counters and the bridge are back (logged on the transition)."""
        if not self.up:
            self.up = True
            self.changed_at = time.time()
            if self.outages:
                self.log.info("redis reachable again: bridge and shared rate limits resume")
            self.last_error = None

    def failed(self, error: BaseException) -> None:
        """A call raised. An error Redis answered with (a key of the wrong type, a command
        refused under memory pressure or by an ACL) leaves the link up: only that call falls
        back. Anything else (refused, reset, timed out) means Redis is unreachable."""
        if isinstance(error, ResponseError):
            self.errors += 1
            self.last_error = redact_text(f"{type(error).__name__}: {error}")
        else:
            self.down(error)

    def down(self, error: BaseException | str) -> None:
        """A call failed: fall back to per-process behaviour until a ping succeeds."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.last_error = redact_text(text)
        if self.up:
            self.up = False
            self.changed_at = time.time()
            self.outages += 1
            self.log.warning(
                "redis unreachable: events stay in this process, rate limits count per process",
                error=self.last_error,
            )

    async def close(self) -> None:
        for client in (self._commands, self._reads):
            if client is not None:
                await client.aclose()
        self._commands = self._reads = None
        self.up = False
