"""openai_compatible: any server that speaks OpenAI's API (vLLM, llama.cpp's server, LocalAI,
text-generation-webui, OpenAI itself) behind Tiffin.

Its models come from the upstream's `/v1/models`, re-read at every health check; each is
served as `<model_prefix><upstream id>` (prefix `<name>/` by default), with per-model aliases,
fallbacks and defaults from `settings.models`. Several upstreams are several config files with
this `_target_` (the file name is the instance's name). Circuit breakers guard the upstream and
each of its models (openai_upstream.py says what each counts): while the upstream's is open,
its requests fail fast and the integration reports `degraded`; while a model's is open, that
model's requests fail fast and the others are served. Each closes again by itself once a trial
request succeeds (the upstream's also when a health check reaches it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.engines.engine import ModelSpec
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import ModelProvider
from runtime.integrations.openai_compatible.circuit import CircuitBreaker, CircuitState
from runtime.integrations.openai_compatible.openai_upstream import UpstreamEngine
from runtime.integrations.platform import platform_model
from runtime.integrations.settings import defaults_of


@dataclass
class CircuitSettings:
    """The circuit breaker in front of the upstream."""

    failure_threshold: int = 5  # failures in a row that open it
    reset_after_s: float = 30.0  # how long it stays open before one request may try again


@dataclass
class OpenAICompatibleSettings:
    """`integrations.<name>.settings` of an OpenAI-compatible upstream."""

    base_url: str = "http://localhost:8080/v1"  # the upstream's /v1 (OPENAI_COMPATIBLE_BASE_URL)
    api_key: str = ""  # sent as a bearer token (OPENAI_COMPATIBLE_API_KEY)
    model_prefix: str = ""  # prefix of the served model ids; empty: `<name>/`
    timeout: float = 300.0  # seconds for a whole request
    connect_timeout: float = 5.0
    max_retries: int = 2  # before the first token: transport errors, 5xx, 429
    retry_backoff_s: float = 0.2  # doubles each retry
    circuit: CircuitSettings = field(default_factory=CircuitSettings)
    max_queue: int = 256  # per model, waiting beyond those running; more get 429
    # Per upstream model: aliases, fallbacks, defaults, max_queue, timeout_s (ModelConfig fields).
    models: dict[str, Any] = field(default_factory=dict)


DEFAULT_OPENAICOMPATIBLEINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.openai_compatible.OpenAICompatibleIntegration",
    name="openai_compatible",
    type=IntegrationType.model_platform,
    priority=40,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(OpenAICompatibleSettings),
)


class OpenAICompatibleIntegration(BaseIntegration, ModelProvider):
    """Offers an OpenAI-compatible upstream's models to the ModelRouter."""

    settings_schema: ClassVar[type[Any]] = OpenAICompatibleSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        settings = self.settings
        self.base_url = str(settings["base_url"]).rstrip("/")
        self.prefix = str(settings["model_prefix"] or f"{self.name}/")
        self.max_retries = int(settings["max_retries"])
        self.retry_backoff_s = float(settings["retry_backoff_s"])
        circuit = settings["circuit"]
        self.circuit_threshold = int(circuit["failure_threshold"])
        self.circuit_reset_after_s = float(circuit["reset_after_s"])
        # The upstream's breaker (can it be reached?) and one per upstream model id.
        self.circuit = CircuitBreaker(self.circuit_threshold, self.circuit_reset_after_s)
        self.model_circuits: dict[str, CircuitBreaker] = {}
        self.overrides: dict[str, Any] = dict(settings["models"])
        # Requests waiting per model beyond those running; the upstream batches or queues them
        # itself, so the bound is wider than a local engine's.
        self.max_queue = int(settings["max_queue"])
        self._client: httpx.AsyncClient | None = None
        self.upstream_models: list[str] = []

    def model_circuit(self, upstream_id: str) -> CircuitBreaker:
        """The breaker of one upstream model (made on first use, kept while it is listed)."""
        circuit = self.model_circuits.get(upstream_id)
        if circuit is None:
            circuit = CircuitBreaker(self.circuit_threshold, self.circuit_reset_after_s)
            self.model_circuits[upstream_id] = circuit
        return circuit

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"{self.name} is not initialized")
        return self._client

    @property
    def secrets(self) -> list[str]:
        """What must never reach a client or a log (an upstream's error may echo it)."""
        return [str(self.settings["api_key"] or "")]

    async def initialize(self) -> None:
        key = str(self.settings["api_key"] or "")
        timeout = float(self.settings["timeout"])
        self._client = self.http_client(
            base_url=self.base_url,
            headers={"authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(timeout, connect=float(self.settings["connect_timeout"])),
        )
        try:
            self.upstream_models = await self._list_models()
        except Exception:
            await self.shutdown()
            raise

    async def health_check(self) -> Health:
        """Re-reads the model list. An upstream that does not answer trips the circuit and
        leaves the integration `degraded` (its models fail fast), not stopped."""
        try:
            found = await self._list_models()
        except (httpx.HTTPError, ValueError) as exc:
            self.circuit.failure()
            detail = f"upstream not answering: {type(exc).__name__}: {exc}"
            return Health(True, detail, degraded=True, data=self._health_data())
        self.circuit.success()
        if found != self.upstream_models:
            self.upstream_models = found
            listed = set(found)
            self.model_circuits = {m: c for m, c in self.model_circuits.items() if m in listed}
            await self.emit("models.changed", {"models": self.model_ids()})
        return Health(True, f"{len(found)} models", data=self._health_data())

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    def _health_data(self) -> dict[str, Any]:
        failing = {
            model: {"circuit": circuit.state.value, "failures": circuit.failures}
            for model, circuit in sorted(self.model_circuits.items())
            if circuit.failures or circuit.state is not CircuitState.closed
        }
        return {
            "circuit": self.circuit.state.value,
            "failures": self.circuit.failures,
            "failing_models": failing,
        }

    async def _list_models(self) -> list[str]:
        response = await self.client.get("/models", timeout=10.0)
        response.raise_for_status()
        return sorted(str(item["id"]) for item in response.json()["data"])

    # --- models -------------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [self.prefix + upstream_id for upstream_id in self.upstream_models]

    def models(self) -> list[ModelSpec]:
        return [self._spec(upstream_id) for upstream_id in self.upstream_models]

    def _spec(self, upstream_id: str) -> ModelSpec:
        def engine(spec: ModelSpec) -> UpstreamEngine:
            return UpstreamEngine(spec, self, upstream_id)

        return platform_model(
            provider=self.name,
            engine="openai_compatible",
            model_id=self.prefix + upstream_id,
            remote_name=upstream_id,
            source=f"{self.base_url}#{upstream_id}",
            max_queue=self.max_queue,
            override=self.overrides.get(upstream_id),
            factory=engine,
            capabilities=UpstreamEngine.capabilities,
        )

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["models"] = self.model_ids()
        described["circuit"] = self._health_data()
        return described
