"""Batch lines on a durable RabbitMQ queue (AMQP 0-9-1, aio-pika). Messages are persistent;
each consumer holds at most `prefetch` unacked ones, and whatever a consumer took but never
acked is delivered again when its connection closes (the process died)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from runtime.integrations.queue.line_queue import Delivery


class AmqpQueue:
    durable = True

    def __init__(self, url: str, queue: str, *, prefetch: int, timeout_s: float = 10.0) -> None:
        self.url = url
        self.queue_name = queue
        self.prefetch = max(1, prefetch)
        self.timeout_s = timeout_s
        self.connection: AbstractRobustConnection | None = None
        self._channel: Any = None
        self._queue: Any = None
        self._taken: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consuming = False

    async def _open(self) -> Any:
        if self._queue is None:
            self.connection = await aio_pika.connect_robust(self.url, timeout=self.timeout_s)
            self._channel = await self.connection.channel()
            await self._channel.set_qos(prefetch_count=self.prefetch)
            self._queue = await self._channel.declare_queue(self.queue_name, durable=True)
        return self._queue

    async def put(self, messages: Sequence[dict[str, Any]]) -> None:
        await self._open()
        exchange = self._channel.default_exchange
        for message in messages:
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(message).encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type="application/json",
                ),
                routing_key=self.queue_name,
            )

    async def take(self, block_s: float) -> Delivery | None:
        queue = await self._open()
        if not self._consuming:
            await queue.consume(self._taken.put)
            self._consuming = True
        with contextlib.suppress(TimeoutError):
            message = await asyncio.wait_for(self._taken.get(), block_s)
            again = bool(message.redelivered)
            return Delivery(json.loads(message.body), tag=message, redelivered=again)
        return None

    async def ack(self, delivery: Delivery) -> None:
        await delivery.tag.ack()

    async def depth(self) -> int:
        await self._open()
        declared = await self._channel.declare_queue(self.queue_name, passive=True)
        return int(declared.declaration_result.message_count or 0)

    async def check(self) -> str:
        await self._open()
        return f"RabbitMQ queue {self.queue_name}"

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
        self.connection = self._channel = self._queue = None
        self._consuming = False
