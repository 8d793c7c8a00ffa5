"""ollama: the models of an Ollama server, served by Tiffin as `ollama/<name>`.

The model list comes from `/api/tags` and is re-read at every health check (health itself is
`/api/version`), so models pulled into Ollama appear without a restart. The platform guide's
calls work as written: `await ollama.pull_model("llama2:7b")` (progress is published as
`ollama.pull` events and returned), `await ollama.generate(model, prompt)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.engines.engine import ModelSpec
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import ModelProvider
from runtime.integrations.ollama.ollama_engine import OllamaEngine, ollama_error
from runtime.integrations.platform import platform_model
from runtime.integrations.settings import defaults_of
from runtime.types import CHAT, COMPLETION, EMBEDDINGS, ProviderError


@dataclass
class OllamaSettings:
    """`integrations.ollama.settings`."""

    base_url: str = "http://localhost:11434"  # the Ollama server (OLLAMA_BASE_URL)
    timeout: float = 300.0  # seconds for one request
    model_prefix: str = "ollama/"  # prefix of the served model ids
    max_queue: int = 256  # per model, waiting beyond those running; more get 429
    # Per Ollama model: aliases, fallbacks, defaults, max_queue, timeout_s (ModelConfig fields).
    models: dict[str, Any] = field(default_factory=dict)


DEFAULT_OLLAMAINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.ollama.OllamaIntegration",
    name="ollama",
    type=IntegrationType.model_platform,
    priority=30,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(OllamaSettings),
)


@dataclass(frozen=True)
class Shown:
    """What Ollama's /api/show says of a model; None where it says nothing."""

    context_length: int | None
    capabilities: frozenset[str] | None


class OllamaIntegration(BaseIntegration, ModelProvider):
    """Offers an Ollama server's models to the ModelRouter, and its model management calls."""

    settings_schema: ClassVar[type[Any]] = OllamaSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.base_url = str(self.settings["base_url"]).rstrip("/")
        self.prefix = str(self.settings["model_prefix"])
        self.overrides: dict[str, Any] = dict(self.settings["models"])
        # Requests waiting per model beyond those running; the server behind batches or queues
        # them itself, so the bound is wider than a local engine's.
        self.max_queue = int(self.settings["max_queue"])
        self.timeout = float(self.settings["timeout"])
        self._client: httpx.AsyncClient | None = None
        self.tags: dict[str, dict[str, Any]] = {}
        # What /api/show says of each model (context length, capabilities), by name and digest.
        self.shown: dict[tuple[str, str], Shown] = {}
        self.version: str | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the ollama integration is not initialized")
        return self._client

    async def initialize(self) -> None:
        self._client = self.http_client(
            base_url=self.base_url, timeout=httpx.Timeout(self.timeout, connect=5.0)
        )
        try:
            self.version = (await self.request_json("/api/version", method="GET"))["version"]
            self.tags = await self._list_tags()
        except Exception:
            await self.shutdown()
            raise

    async def health_check(self) -> Health:
        self.version = (await self.request_json("/api/version", method="GET"))["version"]
        tags = await self._list_tags()
        changed = set(tags) != set(self.tags)
        self.tags = tags  # details (sizes, digests) refresh even when the names stay
        if changed:
            await self.emit("models.changed", {"models": self.model_ids()})
        return Health(True, f"Ollama {self.version}, {len(tags)} models")

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    # --- the platform guide's calls -----------------------------------------------------------

    async def pull_model(self, name: str) -> list[dict[str, Any]]:
        """Pull `name` into Ollama; each progress line is published as an `ollama.pull` event
        (status, digest, total, completed) and returned. Raises ProviderError on failure."""
        progress: list[dict[str, Any]] = []
        request = self.client.build_request("POST", "/api/pull", json={"model": name})
        response = await self.client.send(request, stream=True)
        try:
            if not response.is_success:
                raise ollama_error(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if record.get("error"):
                    raise ollama_error(500, line.encode())
                progress.append(record)
                await self.emit("ollama.pull", {"model": name, **record})
        finally:
            await response.aclose()
        self.tags = await self._list_tags()
        await self.emit("models.changed", {"models": self.model_ids()})
        return progress

    async def generate(self, model: str, prompt: str, **options: Any) -> dict[str, Any]:
        """One whole `/api/generate` answer for `model` (Ollama's own name), as Ollama gives it."""
        body = {"model": model, "prompt": prompt, "stream": False, "options": options}
        answer: dict[str, Any] = await self.request_json("/api/generate", body)
        return answer

    async def chat(self, model: str, messages: list[dict[str, Any]], **options: Any) -> Any:
        body = {"model": model, "messages": messages, "stream": False, "options": options}
        return await self.request_json("/api/chat", body)

    async def loaded_models(self) -> list[dict[str, Any]]:
        """What Ollama has in memory now (`/api/ps`)."""
        return list((await self.request_json("/api/ps", method="GET")).get("models", []))

    async def request_json(
        self, path: str, body: dict[str, Any] | None = None, method: str = "POST"
    ) -> Any:
        try:
            response = await self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            reason = f"Ollama cannot be reached: {type(exc).__name__}: {exc}"
            raise ProviderError(503, reason, code="upstream_unavailable") from None
        if not response.is_success:
            raise ollama_error(response.status_code, response.content)
        try:
            return response.json()
        except ValueError:
            raise ProviderError(
                502, f"Ollama sent no JSON for {path}", code="upstream_error"
            ) from None

    # --- models -------------------------------------------------------------------------------

    async def _list_tags(self) -> dict[str, dict[str, Any]]:
        listed = (await self.request_json("/api/tags", method="GET")).get("models", [])
        tags = {str(m.get("model") or m["name"]): m for m in listed}
        for name, tag in tags.items():
            key = (name, str(tag.get("digest", "")))
            if key not in self.shown:
                self.shown[key] = await self._show(name)
        return tags

    async def _show(self, name: str) -> Shown:
        """A model's context length and capabilities from `/api/show` (older Ollama releases
        list no capabilities: then Tiffin's defaults stand)."""
        try:
            shown = await self.request_json("/api/show", {"model": name})
        except ProviderError as exc:
            self.log.warning("ollama /api/show failed", model=name, error=str(exc))
            return Shown(None, None)
        info = shown.get("model_info") or {}
        lengths = [
            v for k, v in info.items() if k.endswith(".context_length") and isinstance(v, int)
        ]
        said = shown.get("capabilities")
        capabilities = None
        if isinstance(said, list) and said:
            found = set()
            if "completion" in said:
                found |= {CHAT, COMPLETION}
            if "embedding" in said:
                found.add(EMBEDDINGS)
            capabilities = frozenset(found) or None
        return Shown(lengths[0] if lengths else None, capabilities)

    def model_ids(self) -> list[str]:
        return [self.prefix + name for name in sorted(self.tags)]

    def models(self) -> list[ModelSpec]:
        return [self._spec(name) for name in sorted(self.tags)]

    def _spec(self, name: str) -> ModelSpec:
        def engine(spec: ModelSpec) -> OllamaEngine:
            return OllamaEngine(spec, self, name)

        digest = str(self.tags.get(name, {}).get("digest", ""))
        shown = self.shown.get((name, digest), Shown(None, None))

        return platform_model(
            provider=self.name,
            engine="ollama",
            model_id=self.prefix + name,
            remote_name=name,
            source=f"ollama:{name}",
            max_queue=self.max_queue,
            override=self.overrides.get(name),
            factory=engine,
            capabilities=shown.capabilities or OllamaEngine.capabilities,
            context_length=shown.context_length,
        )

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["version"] = self.version
        described["models"] = self.model_ids()
        return described
