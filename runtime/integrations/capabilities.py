"""What the Runtime takes from integrations, declared as Protocols and found by type:

    for name, provider in manager.providing(ModelProvider): ...
    database = manager.require("database", DatabaseIntegration)   # or IntegrationUnavailable

An integration that clearly is one of these names it as a base (`class
DatabaseIntegration(BaseIntegration, RequestLogSink, KeyStore)`), so mypy checks its methods
against the Protocol; one from a plugin may also just have the members (the isinstance check of
a runtime_checkable Protocol only looks for them by name).

- `RequestLogSink`: takes every finished generation request (the database's request log).
- `KeyStore`: API keys kept outside the config (the database's stored keys).
- `RateStoreProvider`: rate-limit counters shared by every process (redis); the counters
  themselves are auth's `RateStore` (runtime/auth/rate_limits.py), the one definition of them.
- `ResponseStoreProvider`: keeps the Responses API's stored answers (the database's).
- `ObjectStoreProvider`: where files live (object_storage: the local filesystem or S3).
- `LineQueueProvider`: the queue batch lines travel on (queue: RabbitMQ, Redis Streams, memory).
- `ModelProvider`: offers models to the ModelRouter (custom_models, ollama, openai_compatible,
  huggingface_hub), and those `python -m runtime plan` lists before anything starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from runtime.auth.rate_limits import RateStore
    from runtime.engines.engine import ModelSpec
    from runtime.integrations.object_storage.object_stores import ObjectStore
    from runtime.integrations.queue.line_queue import LineQueue
    from runtime.persistence.api_keys import ApiKeyStore
    from runtime.response_store import ResponseStore
    from runtime.telemetry.live_stats import GenerationRequestRecord


@runtime_checkable
class RequestLogSink(Protocol):
    """Told of every finished generation request (LiveStats' sink); must not block."""

    def record_request(self, record: GenerationRequestRecord) -> None: ...


@runtime_checkable
class KeyStore(Protocol):
    """Stored API keys, which auth looks a presented key up in after the config's."""

    def api_keys(self) -> ApiKeyStore | None:
        """The store; None while it cannot be read (the integration is not running)."""
        ...


@runtime_checkable
class RateStoreProvider(Protocol):
    """Holds the store the Runtime's RateLimiter counts in instead of its own memory."""

    rate_store: RateStore


@runtime_checkable
class ResponseStoreProvider(Protocol):
    """Keeps the Responses API's answers where every worker sees them."""

    def stored_responses(self, capacity: int) -> ResponseStore | None:
        """The store, keeping at most `capacity` answers; None while it cannot be used."""
        ...


@runtime_checkable
class ModelProvider(Protocol):
    """Offers models (`models()`) to the ModelRouter, which registers them once the integration
    is running and again on its `models.changed` events."""

    def models(self) -> list[ModelSpec]: ...

    def planned_models(self) -> list[dict[str, Any]]:
        """The models `plan` lists before anything starts (no I/O): by default none, since a
        platform's models are known once it answers."""
        return []


@runtime_checkable
class ObjectStoreProvider(Protocol):
    """Keeps files (uploads, batch inputs and results) by key."""

    def object_store(self) -> ObjectStore | None:
        """The store; None while it cannot be used (the integration is not running)."""
        ...


@runtime_checkable
class LineQueueProvider(Protocol):
    """Carries batch lines to the workers of every process."""

    def line_queue(self) -> LineQueue | None:
        """The queue; None while it cannot be used (the integration is not running)."""
        ...
