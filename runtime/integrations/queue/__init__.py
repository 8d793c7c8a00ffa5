"""queue: the message queue the Batch API's lines travel on (`queue_integration.py`): RabbitMQ
(`amqp_queue.py`), Redis Streams (`redis_queue.py`) or in-process (`line_queue.py`)."""

from runtime.integrations.queue.line_queue import Delivery, LineQueue, MemoryQueue
from runtime.integrations.queue.queue_integration import (
    DEFAULT_QUEUEINTEGRATION_CONFIG,
    QueueIntegration,
    QueueSettings,
)

__all__ = [
    "DEFAULT_QUEUEINTEGRATION_CONFIG",
    "Delivery",
    "LineQueue",
    "MemoryQueue",
    "QueueIntegration",
    "QueueSettings",
]
