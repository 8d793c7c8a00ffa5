"""`integrations=queue`: the message queue batch lines travel on (the Batch API). RabbitMQ when
`amqp_url` is set (AMQP_URL), else Redis Streams with a consumer group when the redis
integration is selected (its url), else an in-process queue. Others take the queue through
`LineQueueProvider` (runtime/integrations/capabilities.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.errors import ConfigError
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import LineQueueProvider
from runtime.integrations.queue.amqp_queue import AmqpQueue
from runtime.integrations.queue.line_queue import LineQueue, MemoryQueue
from runtime.integrations.queue.redis_queue import RedisStreamQueue
from runtime.integrations.settings import defaults_of
from runtime.secrets import redact_text

BACKENDS = ("auto", "memory", "redis", "rabbitmq")


@dataclass
class QueueSettings:
    """`integrations.queue.settings`."""

    backend: str = "auto"  # auto: rabbitmq if amqp_url, else redis if redis_url, else memory
    amqp_url: str = ""  # amqp://user:password@host:5672/vhost (AMQP_URL)
    redis_url: str = ""  # the redis integration's url when it is selected
    name: str = "tiffin.batch.lines"  # the RabbitMQ queue, or the Redis stream's name
    group: str = "tiffin-batch"  # Redis: the consumer group every worker reads through
    # Redis: a line taken by a worker that has not acked it for this long (it died) is
    # claimed by another; keep it above the slowest line's time.
    redeliver_after_s: float = 300.0
    prefetch: int = 8  # RabbitMQ: unacked lines one worker holds
    timeout_s: float = 10.0  # connecting and each call


DEFAULT_QUEUEINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.queue.QueueIntegration",
    name="queue",
    type=IntegrationType.external_service,
    priority=20,
    dependencies=["object_storage"],
    health_check_interval=15.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(QueueSettings),
)


def backend_of(settings: dict[str, Any]) -> str:
    backend = str(settings["backend"])
    if backend != "auto":
        return backend
    if settings["amqp_url"]:
        return "rabbitmq"
    return "redis" if settings["redis_url"] else "memory"


class QueueIntegration(BaseIntegration, LineQueueProvider):
    """One LineQueue, checked at start and by every health check."""

    settings_schema: ClassVar[type[Any]] = QueueSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        where = f"integrations.{self.name}.settings"
        setting = self.settings.__getitem__
        if setting("backend") not in BACKENDS:
            raise ConfigError(
                f"{where}.backend", setting("backend"), f"one of: {', '.join(BACKENDS)}"
            )
        self.backend = backend_of(self.settings)
        if self.backend == "rabbitmq" and not setting("amqp_url"):
            raise ConfigError(f"{where}.amqp_url", "", "an amqp:// URL with backend: rabbitmq")
        if self.backend == "redis" and not setting("redis_url"):
            raise ConfigError(f"{where}.redis_url", "", "a redis:// URL with backend: redis")
        self.queue: LineQueue
        if self.backend == "rabbitmq":
            self.queue = AmqpQueue(
                str(setting("amqp_url")),
                str(setting("name")),
                prefetch=int(setting("prefetch")),
                timeout_s=float(setting("timeout_s")),
            )
        elif self.backend == "redis":
            self.queue = RedisStreamQueue(
                str(setting("redis_url")),
                str(setting("name")),
                str(setting("group")),
                redeliver_after_s=float(setting("redeliver_after_s")),
                socket_timeout_s=float(setting("timeout_s")),
            )
        else:
            self.queue = MemoryQueue()
        self.where = ""

    def line_queue(self) -> LineQueue | None:
        return self.queue if self.initialized else None

    async def initialize(self) -> None:
        try:
            self.where = await self.queue.check()
        except BaseException:
            await self.queue.close()
            raise

    async def health_check(self) -> Health:
        try:
            self.where = await self.queue.check()
        except Exception as exc:
            return Health(False, redact_text(f"{type(exc).__name__}: {exc}"))
        return Health(True, self.where)

    async def shutdown(self) -> None:
        await self.queue.close()
