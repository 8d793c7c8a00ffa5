"""The Runtime: built from one composed config, it owns every long-lived object (plugins, event
bus, integration manager, handler table) and nothing else in the process holds state.

    runtime = Runtime(compose(["integrations=ollama"]), builtins=handlers.builtin_plugins())
    await runtime.start()      # integrations in dependency order; raises StartupError
    ...                        # transports call runtime.dispatcher.dispatch(route, event)
    await runtime.stop()       # reverse order

Construction does no I/O, so the CLI's `plan` and BentoML's import of the service can build one
cheaply; `start()` is where connections are made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, cast

import structlog
from omegaconf import DictConfig, OmegaConf

from hooks import make_plugin_manager, resolve, resolve_all
from hooks.builtin import BuiltinEngines, CostFromConfig
from hooks.live_recorder import LiveStatsRecorder
from hooks.metrics_recorder import MetricsRecorder
from hooks.request_limits import RequestLimits
from runtime.auth import Auth, MemoryRateStore
from runtime.batches.batch_service import BatchService
from runtime.config_schema import IntegrationConfig, TiffinConfig, Topology
from runtime.dispatch import Dispatcher, Handler
from runtime.errors import ConfigError
from runtime.events import BusEvent, EventBus
from runtime.integrations import (
    IntegrationManager,
    IntegrationRegistry,
    IntegrationUnavailable,
    KeyStore,
    ModelProvider,
    RateStoreProvider,
    RequestLogSink,
)
from runtime.integrations.base import Health
from runtime.integrations.capabilities import ResponseStoreProvider
from runtime.integrations.manager import Sleep
from runtime.integrations.opentelemetry import tracing_settings
from runtime.models import ModelRouter
from runtime.reconfigure import Reconfigurer
from runtime.response_store import MemoryResponses, ResponseStore
from runtime.runner_client import RemoteEngine, RunnerClient
from runtime.secrets import redact
from runtime.telemetry.live_stats import GenerationRequestRecord, LiveStats
from runtime.telemetry.metrics import Metrics
from runtime.telemetry.tracing import Tracing

# After the drain timeout, how long aborted streams get to send their last chunk.
DRAIN_ABORT_GRACE_S = 5.0

# Tiffin's own behaviour, as plugins on the same hooks a user's plugin implements (most are
# `trylast`, so a plugin can override them). Each is built from the Runtime; None: switched off.
# The handlers (handlers/__init__.py) come in through `Runtime(builtins=...)`: runtime/ does not
# import them.
DEFAULT_PLUGINS: tuple[Callable[[Runtime], object | None], ...] = (
    lambda runtime: CostFromConfig(),  # estimate_cost from a model's `prices`
    lambda runtime: BuiltinEngines(),  # register_engines: llama_cpp, embeddings, transformers...
    lambda runtime: LiveStatsRecorder(runtime.live),  # /ws/metrics, GraphQL `metrics`
    lambda runtime: runtime.auth.plugin,  # authenticate: API keys, OIDC, scopes, rate limits
    lambda runtime: runtime.request_limits,  # limits.max_tokens, streams
    lambda runtime: (
        MetricsRecorder(  # /metrics
            runtime.metrics, runtime.settings.telemetry.sample_interval_s
        )
        if runtime.settings.telemetry.metrics
        else None
    ),
)


def to_settings(cfg: DictConfig) -> TiffinConfig:
    """The composed DictConfig as typed dataclasses (interpolations resolved)."""
    return cast(TiffinConfig, OmegaConf.to_object(cfg))


class Runtime:
    """One serving runtime. A test can build one, start it, and throw it away."""

    settings: TiffinConfig
    metrics: Metrics
    live: LiveStats
    auth: Auth
    request_limits: RequestLimits

    def __init__(
        self,
        cfg: DictConfig,
        *,
        builtins: Iterable[object] = (),
        sleep: Sleep | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = to_settings(cfg)
        self.log = structlog.get_logger("tiffin.runtime")
        self.metrics = Metrics()
        self.tracing = Tracing(tracing_settings(self.settings))
        self.live = LiveStats()
        self.memory_responses = MemoryResponses(self.settings.limits.stored_responses)
        self.request_limits = RequestLimits(self.settings.limits)
        # Hashes the configured keys and drops the plain ones from self.settings.
        self.auth = Auth.from_settings(self.settings)
        self.plugins = make_plugin_manager(
            [p for make in DEFAULT_PLUGINS if (p := make(self)) is not None] + list(builtins),
            self.settings.plugins,
            load_entrypoints=self.settings.load_entrypoint_plugins,
        )
        self.events = EventBus()
        self.events.subscribe("*", self._forward_event)
        self.registry = IntegrationRegistry()
        self.plugins.hook.register_integrations(register=self.registry.register)
        self.handlers = self._collect_handlers()
        # Engine factories by name; the model router (issue 4) builds engines from these.
        self.engine_factories: dict[str, Callable[..., Any]] = {}
        self.plugins.hook.register_engines(register=self.engine_factories.setdefault)
        self.models = ModelRouter(self.events, self.engine_factories)
        self.integrations = IntegrationManager(
            self._integration_configs(),
            self.registry,
            self.events,
            on_check=self._health_checked,
            **({"sleep": sleep} if sleep else {}),
        )
        self.use_tracing(self.tracing)
        self._sinks: list[Callable[[GenerationRequestRecord], None]] = []
        self.key_store: KeyStore | None = None
        self.rewire()
        self.dispatcher = Dispatcher(
            self,
            self.handlers,
            {name: route.handler for name, route in self.settings.handlers.routes.items()},
            request_timeout_s=self.settings.server.request_timeout_s,
        )
        self.runner: RunnerClient | None = None
        self.started = False
        self.reconfigure = Reconfigurer(self)
        # The Batch API's worker and supervisor (with integrations=queue).
        self.batches = BatchService(self)
        check_server_settings(self.settings)

    # --- lifecycle ------------------------------------------------------------------------------

    def use_runner(self, client: RunnerClient) -> None:
        """Under `serving.topology=split`: the models of `serving.runner_engines` run in the
        runner service that `client` reaches (bentos/runner.py), not in this process."""
        for engine in self.settings.serving.runner_engines:
            self.engine_factories[engine] = partial(RemoteEngine, client=client)
        self.runner = client

    async def start(self) -> None:
        """Start integrations (raises StartupError if a required one fails), then tell plugins."""
        if self.settings.serving.topology is Topology.split and self.runner is None:
            raise ConfigError(
                "serving.topology", "split", "a runner service (serve through bentos.service)"
            )
        self.log.info(
            "runtime starting", env=self.settings.env, integrations=self.integrations.order
        )
        for warning in self.warnings():
            self.log.warning(warning["message"], code=warning["code"])
        self.tracing.start()
        await self.integrations.start_all()
        for name in self.integrations.order:
            await self._offer_models(name)
        # A platform that comes up later, or whose model list changes, is synced as it happens.
        for pattern in ("integration.started", "integration.recovered", "models.changed"):
            self.events.subscribe(pattern, self._on_models_event)
        await self.models.start()
        await self.batches.start()
        self.started = True
        await resolve_all(self.plugins.hook.runtime_started(runtime=self))
        self.log.info("runtime started", **self.integrations.summary())

    async def drain(self, timeout_s: float | None = None) -> int:
        """Graceful shutdown's first step: refuse new requests with 503 (`/readyz` says not
        ready), give those in flight `server.drain_timeout_s` to finish, then end the open
        generation streams with finish_reason "abort". Returns how many were aborted."""
        timeout = self.settings.server.drain_timeout_s if timeout_s is None else timeout_s
        self.log.info("draining", in_flight=len(self.dispatcher.in_flight), timeout_s=timeout)
        left = await self.dispatcher.drain(timeout, abort_grace_s=DRAIN_ABORT_GRACE_S)
        if left:
            self.log.warning("drain timeout passed: open streams aborted", aborted=left)
        return left

    async def stop(self) -> None:
        """Tell plugins, then stop integrations in reverse start order. Safe to call twice."""
        if self.started:
            await resolve_all(self.plugins.hook.runtime_stopping(runtime=self))
        self.started = False
        await self.reconfigure.wait_retired(hurry=True)
        await self.batches.stop()  # lines running are not acked: they run again elsewhere
        await self.models.stop()
        await self.auth.close()  # last_used_at of stored keys, while the database is up
        await self.integrations.stop_all()
        self.log.info("runtime stopped")
        await self.tracing.shutdown()  # last: flushes the spans of everything above

    @property
    def responses(self) -> ResponseStore:
        """Where the Responses API keeps answers: the database while one runs (every worker
        sees them), else this worker's memory."""
        capacity = self.settings.limits.stored_responses
        for _, provider in self.integrations.providing(ResponseStoreProvider):
            store = provider.stored_responses(capacity)
            if store is not None:
                return store
        return self.memory_responses

    @property
    def ready(self) -> bool:
        """Started, not draining, every required integration up, and every preloaded model
        able to serve (`/readyz`, gRPC health): a model unloaded for idleness still counts, as
        the next request loads it again."""
        return (
            self.started
            and not self.dispatcher.draining
            and self.integrations.ready
            and self.models.ready
        )

    # --- descriptions ---------------------------------------------------------------------------

    def warnings(self) -> list[dict[str, str]]:
        """Configuration that serves, but not as an operator would want: logged at start, shown
        by `python -m runtime check` and in /integrations/status and /integrations/health."""
        found: list[dict[str, str]] = []
        keyless = self.auth.keyless_warning()
        if keyless:
            found.append({"code": "auth_without_keys", "message": keyless})
        lonely = self.batches.lonely_queue_warning()
        if lonely:
            found.append({"code": "batch_queue_per_worker", "message": lonely})
        return found

    def plan(self) -> dict[str, Any]:
        """The resolved start plan that `python -m runtime plan` prints; starts nothing."""
        server = self.settings.server
        integrations = []
        for name, cfg in self.settings.integrations.items():
            entry: dict[str, Any] = {
                "name": name,
                "type": cfg.type.value,
                "enabled": cfg.enabled,
                "required": cfg.required,
                "priority": cfg.priority,
                "dependencies": list(cfg.dependencies),
                "target": cfg._target_,
            }
            if cfg.because:
                entry["because"] = cfg.because
            integrations.append(entry)
        return {
            "env": self.settings.env,
            "integrations": integrations,
            "start_order": list(self.integrations.order),
            "models": self._planned_models(),
            "endpoints": {
                "http": f"{server.host}:{server.http_port}",
                "grpc": f"{server.host}:{server.grpc_port}",
                "routes": {
                    name: f"{route.http.method} {route.http.path}"
                    for name, route in self.settings.handlers.routes.items()
                    if route.http is not None
                },
            },
            "serving": {
                "topology": self.settings.serving.topology.value,
                "runner_engines": list(self.settings.serving.runner_engines),
                "api_gpus": self.settings.serving.api_gpus,
            },
            "workers": server.workers,
            # Key names only: the keys themselves were dropped once hashed.
            "auth": {"enforced": self.auth.enforced, "keys": self.auth.keys.names()},
            "plugins": sorted(name for name, _ in self.plugins.list_name_plugin()),
        }

    def _planned_models(self) -> list[dict[str, Any]]:
        planned: list[dict[str, Any]] = []
        for name, provider in self.integrations.providing(ModelProvider):
            planned += [{"provider": name, **entry} for entry in provider.planned_models()]
        return planned

    def redacted_config(self) -> dict[str, Any]:
        container = OmegaConf.to_container(self.cfg, resolve=True)
        return cast(dict[str, Any], redact(container))

    # --- wiring ---------------------------------------------------------------------------------

    def rewire(self) -> None:
        """Connect what integrations provide: the database's request log and stored keys,
        Redis's shared rate counts. Again after an apply added, removed or replaced one."""
        sinks: list[Callable[[GenerationRequestRecord], None]] = [
            sink.record_request for _, sink in self.integrations.providing(RequestLogSink)
        ]
        self.live.sinks[:] = [s for s in self.live.sinks if s not in self._sinks] + sinks
        self._sinks = sinks
        stores = [keys for _, keys in self.integrations.providing(KeyStore)]
        key_store = stores[0] if stores else None
        if key_store is not self.key_store:
            self.key_store = key_store
            if key_store is None:
                self.auth.plugin.stored = None
            else:
                self.auth.use_store(key_store.api_keys, self.settings)
        shared = [p.rate_store for _, p in self.integrations.providing(RateStoreProvider)]
        if shared:
            self.auth.limiter.store = shared[0]
        elif not isinstance(self.auth.limiter.store, MemoryRateStore):
            self.auth.limiter.store = MemoryRateStore()

    def use_tracing(self, tracing: Tracing) -> None:
        """Trace new requests and integrations' HTTP clients through `tracing`."""
        self.tracing = tracing
        for integration in self.integrations.integrations.values():
            integration.tracing = tracing

    def _integration_configs(self) -> dict[str, IntegrationConfig]:
        return dict(self.settings.integrations)

    def _collect_handlers(self) -> dict[str, Handler]:
        found: dict[str, Handler] = {}

        def register(name: str, fn: Callable[..., Any]) -> None:
            found.setdefault(name, fn)

        self.plugins.hook.register_handlers(register=register)
        for route_name, route in self.settings.handlers.routes.items():
            if route.handler not in found:
                raise ConfigError(
                    f"handlers.routes.{route_name}.handler",
                    route.handler,
                    f"a registered handler: {', '.join(sorted(found)) or '(none)'}",
                )
        return found

    async def _offer_models(self, name: str) -> None:
        """Register the models a model-platform integration offers (its `models()`)."""
        try:
            provider = self.integrations.require(name, ModelProvider)
        except IntegrationUnavailable:
            return  # not a model provider, or not running
        await self.models.sync(name, provider.models())

    async def _on_models_event(self, event: BusEvent) -> None:
        # integration.* events name the integration in data; models.changed comes from it.
        # Another worker's (bridged through Redis) is about that worker's integrations.
        if event.remote:
            return
        name = event.data.get("name") if event.source == "integrations" else event.source
        if self.started and isinstance(name, str):
            await self._offer_models(name)

    async def _health_checked(self, name: str, health: Health) -> None:
        await resolve_all(self.plugins.hook.after_health_check(name=name, health=health))

    async def _forward_event(self, event: BusEvent) -> None:
        await resolve_all(self.plugins.hook.on_event(event=event))

    async def call_first(self, hook: str, **kwargs: Any) -> Any:
        """Call a first-result hook by name and await its result if needed."""
        return await resolve(getattr(self.plugins.hook, hook)(**kwargs))


def check_server_settings(settings: TiffinConfig) -> None:
    """Server settings that would serve badly; raises ConfigError."""
    server = settings.server
    if server.graceful_timeout_s <= server.drain_timeout_s + DRAIN_ABORT_GRACE_S:
        raise ConfigError(
            "server.graceful_timeout_s",
            server.graceful_timeout_s,
            f"more than server.drain_timeout_s + {DRAIN_ABORT_GRACE_S:g}"
            f" ({server.drain_timeout_s + DRAIN_ABORT_GRACE_S:g})",
        )
    if "*" in server.cors.allow_origins and server.cors.allow_credentials:
        # Starlette would echo any origin back with credentials allowed: every site could
        # call the API with its visitors' cookies.
        raise ConfigError(
            "server.cors.allow_origins",
            list(server.cors.allow_origins),
            "a list of origins, not '*', when server.cors.allow_credentials is true",
        )


def compose_runtime(overrides: Sequence[str] = (), **kwargs: Any) -> Runtime:
    """Compose `conf/` with overrides and build a Runtime (convenience for scripts and tests)."""
    from runtime.config import compose

    return Runtime(compose(overrides), **kwargs)
