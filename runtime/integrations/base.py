"""The contract every integration implements, as the platform guide describes it."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import httpx
import structlog

from runtime.config_schema import IntegrationConfig
from runtime.events import BusEvent, EventBus
from runtime.integrations.settings import check_settings
from runtime.secrets import redact, redact_text
from runtime.telemetry.tracing import Tracing


class IntegrationStatus(StrEnum):
    """Lifecycle of one integration, as `/integrations/status` reports it."""

    inactive = "inactive"  # configured, not started (yet)
    initializing = "initializing"
    active = "active"  # initialized and healthy, and so is everything it depends on
    degraded = "degraded"  # running, or waiting to start, while a dependency is down
    error = "error"  # failed to initialize, or its health check fails
    stopped = "stopped"


UP = (IntegrationStatus.active, IntegrationStatus.degraded)


@dataclass(frozen=True)
class Health:
    """Result of one health check."""

    healthy: bool
    detail: str = ""
    latency_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    checked_at: float = field(default_factory=time.time)
    # Working, but not fully (e.g. a circuit breaker open on its upstream): status `degraded`.
    degraded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "degraded": self.degraded,
            "detail": redact_text(self.detail),
            "latency_s": round(self.latency_s, 6),
            "checked_at": self.checked_at,
            "data": redact(self.data),
        }


class BaseIntegration(ABC):
    """Base class for integrations: subclass, implement `initialize` and `health_check`.

    `initialize()` may be called again after it failed (retries, background recovery), so it must
    leave nothing half-open when it raises. `shutdown()` must be safe to call at any time.
    The manager owns `status`; integrations report through exceptions and `Health`.

    `settings_schema` is the dataclass of the integration's settings (runtime/integrations/
    settings.py): `self.settings` is `config.settings` checked against it (ConfigError for an
    unknown setting, a wrong type or a missing required one), converted and with its defaults.
    """

    settings_schema: ClassVar[type[Any] | None] = None

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        self.config = config
        self.name = config.name
        schema = type(self).settings_schema
        where = f"integrations.{config.name}.settings"
        self.settings: dict[str, Any] = (
            check_settings(schema, config.settings, where) if schema else dict(config.settings)
        )
        self.bus = bus or EventBus()
        self.status = IntegrationStatus.inactive
        self.initialized = False
        self.last_error: str | None = None
        self.last_health: Health | None = None
        self.started_at: float | None = None
        self.restarts = 0
        self.log = structlog.get_logger("tiffin.integration").bind(integration=self.name)
        # The Runtime's tracing (the Runtime sets it); off for an integration built on its own.
        self.tracing = Tracing.disabled()

    @abstractmethod
    async def initialize(self) -> None:
        """Connect, load, or verify whatever the integration needs; raise on failure."""

    @abstractmethod
    async def health_check(self) -> Health:
        """Report whether the integration can do its work now; may raise (counts as unhealthy)."""

    async def shutdown(self) -> None:  # noqa: B027 - optional for integrations holding nothing
        """Release what `initialize` acquired. The default holds nothing."""

    def http_client(self, **options: Any) -> httpx.AsyncClient:
        """An httpx client for this integration's outgoing calls (`options` as httpx takes
        them). With tracing on, each request gets a client span and carries `traceparent`."""
        client = httpx.AsyncClient(**options)
        self.tracing.instrument_http_client(client)
        return client

    async def emit(self, event_type: str, data: dict[str, Any] | None = None) -> None:
        """Publish `<event_type>` from this integration on the event bus (e.g. `ollama.pull`)."""
        await self.bus.publish(BusEvent(type=event_type, source=self.name, data=data or {}))

    def describe(self) -> dict[str, Any]:
        """What `/integrations/{name}/status` shows: config and state, secrets masked."""
        cfg = self.config
        return {
            "name": self.name,
            "type": cfg.type.value,
            "status": self.status.value,
            "enabled": cfg.enabled,
            "required": cfg.required,
            "priority": cfg.priority,
            "dependencies": list(cfg.dependencies),
            "because": cfg.because,
            "started_at": self.started_at,
            "restarts": self.restarts,
            "last_error": redact_text(self.last_error) if self.last_error else None,
            "health": self.last_health.to_dict() if self.last_health else None,
            "health_check_interval": cfg.health_check_interval,
            "settings": redact(self.settings),
        }
