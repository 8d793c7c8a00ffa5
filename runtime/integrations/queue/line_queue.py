"""The queue batch lines travel on: one interface (`LineQueue`) over an in-process queue (here),
Redis Streams with a consumer group (redis_queue.py) and RabbitMQ (amqp_queue.py). A message is
one JSON object; a worker acks it only after its result is stored, so a message taken by a
process that dies is delivered again (by the durable queues) to another."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass
class Delivery:
    """A message taken from the queue; `tag` is what acking it needs."""

    message: dict[str, Any]
    tag: Any = None
    redelivered: bool = False  # taken before by a consumer that never acked it


@runtime_checkable
class LineQueue(Protocol):
    # Whether messages outlive this process: if not, the batch supervisor queues the lines of
    # unfinished batches again after a restart.
    durable: bool

    async def put(self, messages: Sequence[dict[str, Any]]) -> None: ...

    async def take(self, block_s: float) -> Delivery | None:
        """The next message, waiting up to `block_s` for one; None if none came."""
        ...

    async def ack(self, delivery: Delivery) -> None: ...

    async def depth(self) -> int:
        """Messages waiting to be taken."""
        ...

    async def check(self) -> str:
        """Raise when the queue cannot be used; else a line saying what it is."""
        ...

    async def close(self) -> None: ...


class MemoryQueue:
    """This process's queue: lost when it stops (the supervisor queues unfinished lines again)."""

    durable = False

    def __init__(self) -> None:
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def put(self, messages: Sequence[dict[str, Any]]) -> None:
        for message in messages:
            self._queue.put_nowait(message)

    async def take(self, block_s: float) -> Delivery | None:
        with contextlib.suppress(TimeoutError):
            return Delivery(await asyncio.wait_for(self._queue.get(), block_s))
        return None

    async def ack(self, delivery: Delivery) -> None:
        return None

    async def depth(self) -> int:
        return self._queue.qsize()

    async def check(self) -> str:
        return "in-process queue (this worker only; not kept across restarts)"

    async def close(self) -> None:
        return None
