"""redis: one Redis (`REDIS_URL`) shared by every worker and replica, for two things.

- The event bridge (redis_bridge.py): model, integration, pull, alert and dashboard events
  published in one process reach the buses of all the others through a Redis Stream, so
  `/ws/models`, GraphQL's `modelStatusUpdates` and the alert feed see every worker's events.
- Rate-limit counters (redis_rates.py): the Runtime's RateLimiter counts in Redis, so a key's
  limit is one total across processes.

Losing Redis degrades to per-process behaviour: the integration reports unhealthy, events go on
flowing on each process's own bus, limits count per process, and no request waits on Redis for
more than `socket_timeout_s` once. A watch loop pings every `reconnect_interval_s`; when Redis
answers again the bridge and the shared counters resume.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import RateStoreProvider
from runtime.integrations.redis.redis_bridge import EventBridge
from runtime.integrations.redis.redis_link import RedisLink, cancel_until_done
from runtime.integrations.redis.redis_rates import RedisRateStore
from runtime.integrations.settings import defaults_of
from runtime.secrets import redact_text

# What crosses between processes: what /ws/models, modelStatusUpdates and alert feeds show.
BRIDGED_EVENTS = [
    "model.*",
    "integration.*",
    "*.pull",
    "huggingface_hub.download",
    "alert.*",
    "config.*",  # applies and refusals, each with the config hash of the worker that made it
    "reconfigure.*",  # the config an apply made, for every other worker to apply too
    "batch.*",  # batch status changes, for GraphQL's batchStatus on every worker
]


@dataclass
class RedisSettings:
    """`integrations.redis.settings`."""

    url: str = "redis://localhost:6379/0"  # REDIS_URL
    stream: str = "tiffin:events"  # the Redis Stream that bridges events
    stream_maxlen: int = 10_000  # about how many entries the stream keeps
    key_prefix: str = "tiffin:"  # of every key Tiffin writes
    bridge_events: list[str] = field(default_factory=lambda: list(BRIDGED_EVENTS))
    socket_timeout_s: float = 0.5  # every call to Redis (connect, command)
    block_s: float = 1.0  # how long a blocking stream read waits beyond socket_timeout_s
    reconnect_interval_s: float = 1.0  # between pings while Redis is down


DEFAULT_REDISINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.redis.RedisIntegration",
    name="redis",
    type=IntegrationType.external_service,
    priority=5,
    health_check_interval=10.0,
    retry_config=RetryConfig(max_retries=2, backoff_factor=2.0, max_backoff=30.0),
    settings=defaults_of(RedisSettings),
)


class RedisIntegration(BaseIntegration, RateStoreProvider):
    """The event bridge and the shared rate-limit store on one Redis."""

    settings_schema: ClassVar[type[Any]] = RedisSettings
    # The Runtime's RateLimiter counts here (RateStoreProvider): in Redis while it is up.
    rate_store: RedisRateStore

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        setting = self.settings.__getitem__  # every setting, defaults filled in (RedisSettings)
        self.url = str(setting("url") or RedisSettings.url)
        self.reconnect_interval_s = float(setting("reconnect_interval_s"))
        self.link = RedisLink(
            self.url,
            socket_timeout_s=float(setting("socket_timeout_s")),
            block_s=float(setting("block_s")),
            log=self.log,
        )
        # This process among all that share the stream: host, pid, and a nonce for the
        # runtimes that one process may hold (tests, a runner beside the API service).
        origin = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.bridge = EventBridge(
            self.link,
            self.bus,
            stream=str(setting("stream")),
            origin=origin,
            patterns=[str(p) for p in setting("bridge_events")],
            maxlen=int(setting("stream_maxlen")),
        )
        self.rate_store = RedisRateStore(self.link, str(setting("key_prefix")))
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        # The longest one Redis call may take: a stop waits no longer than this for a task.
        self.call_limit_s = float(setting("block_s")) + float(setting("socket_timeout_s"))

    async def initialize(self) -> None:
        self._stopping = False
        self.link.open()
        try:
            await self.link.ping()
            await self.bridge.start()
        except Exception:
            await self.shutdown()
            raise
        self.link.restored()
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_loop(), name="tiffin:redis-watch"
        )

    async def _watch_loop(self) -> None:
        """Read the stream while Redis is up; ping it back to life while it is not. Ends when
        cancelled, or at the next turn once a stop began (a cancel redis-py lost)."""
        while not self._stopping:
            if self.link.up:
                try:
                    await self.bridge.read_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.link.failed(exc)
                    if self.link.up:  # Redis answered with an error: not in a tight loop
                        await asyncio.sleep(self.reconnect_interval_s)
                continue
            await asyncio.sleep(self.reconnect_interval_s)
            try:
                await self.link.ping()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.down(exc)
                continue
            self.link.restored()

    async def health_check(self) -> Health:
        data = self._state()
        if not self.link.up:
            reason = self.link.last_error or "not connected"
            detail = f"unreachable ({reason}); events and limits per process"
            return Health(False, detail, data=data)
        try:
            latency = await self.link.ping()
            length = await self.link.commands.xlen(self.bridge.stream)
        except Exception as exc:
            self.link.failed(exc)
            raise
        data["stream_length"] = int(length)
        bridge = self.bridge
        detail = (
            f"connected; stream {bridge.stream} ({length} entries), "
            f"sent {bridge.sent}, received {bridge.received}, last id {bridge.last_id}"
        )
        return Health(True, detail, latency_s=latency, data=data)

    async def shutdown(self) -> None:
        """Stop the watch loop and the bridge, then close the clients: at once, even with a
        stream read blocked in Redis (cancelled; cancelled again should redis-py lose it)."""
        self._stopping = True
        if self._watch is not None:
            if not await cancel_until_done(self._watch, self.call_limit_s + 1.0):
                self.log.warning("redis watch loop did not stop; closing its connection")
            self._watch = None
        await self.bridge.stop(self.call_limit_s + 1.0)
        await self.link.close()

    @property
    def connected(self) -> bool:
        return self.link.up

    def _state(self) -> dict[str, Any]:
        store = self.rate_store
        return {
            "connected": self.link.up,
            "since": self.link.changed_at,
            "outages": self.link.outages,
            "errors": self.link.errors,
            "link_error": self.link.last_error,
            "bridge": self.bridge.describe(),
            "rate_limits": {
                "store": "redis" if self.link.up else "memory (redis down)",
                "shared_adds": store.shared_adds,
                "fallback_adds": store.fallback_adds,
            },
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "redis_url": redact_text(self.url), **self._state()}
