"""The built-in metrics plugin: records Tiffin's Prometheus metrics from hooks and events.

Registered by the Runtime (with `trylast`, like every built-in) when `telemetry.metrics` is on.
Requests and generations are recorded as they finish; model loads and integration status from
bus events; gauges that describe state (CPU, memory, GPU, queue depth, loaded models,
integrations up, the batching engines' slots and counts) are sampled every
`telemetry.sample_interval_s` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from hooks.specs import hookimpl
from runtime.telemetry.batching import batching_stats
from runtime.telemetry.metrics import GenerationRecord, Metrics, RequestRecord, error_type_for
from runtime.telemetry.resources import ResourceReader

# IntegrationStatus values that count as up (runtime.integrations.base.UP; hooks sit below
# the integrations package, so the values are spelled here).
UP_VALUES = frozenset({"active", "degraded"})


class MetricsRecorder:
    def __init__(self, metrics: Metrics, sample_interval_s: float = 5.0) -> None:
        self.metrics = metrics
        self.sample_interval_s = sample_interval_s
        self._runtime: Any = None
        self._sampler: asyncio.Task[None] | None = None
        self._reader: ResourceReader | None = None
        self._log = structlog.get_logger("tiffin.metrics")

    # --- requests -------------------------------------------------------------------------------

    @hookimpl(trylast=True)
    def request_started(self, event: Any, ctx: Any) -> None:
        self.metrics.request_started(event.route, event.transport)

    @hookimpl(trylast=True)
    def request_finished(
        self, event: Any, ctx: Any, status: int, seconds: float, error: Any
    ) -> None:
        if error is not None:
            error_type = getattr(error, "type", "server_error")
        else:  # a handler's Reply with an error status (Ollama's API), a crash, a cancel
            error_type = error_type_for(status)
        self.metrics.request_finished(
            RequestRecord(
                endpoint=event.route,
                transport=event.transport,
                status=status,
                seconds=seconds,
                model=ctx.model,
                provider=ctx.provider,
                error_type=error_type,
            )
        )

    @hookimpl(trylast=True)
    def after_generate(self, request: Any, response: Any, ctx: Any) -> None:
        usage = response.get("usage")
        if usage is None:  # not a generation Tiffin ran (a plugin calling the hook itself)
            return
        self.metrics.generation_finished(
            GenerationRecord(
                model=str(response.get("model") or getattr(request, "model", "")),
                provider=str(response.get("provider") or ""),
                prompt_tokens=int(usage.prompt_tokens),
                completion_tokens=int(usage.completion_tokens),
                seconds=float(response.get("seconds") or 0.0),
                ttft_s=response.get("ttft_s"),
                cost=float(response.get("cost") or 0.0),
            )
        )

    # --- events and health ----------------------------------------------------------------------

    @hookimpl(trylast=True)
    def on_event(self, event: Any) -> None:
        if event.remote:
            return  # another worker's, bridged through Redis: its own metrics count it
        data = event.data
        if event.type in ("model.loaded", "model.load_failed"):
            model, provider = str(data.get("model", "")), str(data.get("provider", ""))
            self.metrics.model_load(model, provider, ok=event.type == "model.loaded")
            self._count_active_models()
        elif event.type == "model.unloaded":
            self._count_active_models()
        elif event.source == "integrations" and "name" in data and "status" in data:
            self._integration_up(str(data["name"]), data["status"] in UP_VALUES)
            if event.type == "integration.recovered" and data.get("restart"):
                self.metrics.restarts.labels(data["name"]).inc()

    @hookimpl(trylast=True)
    def after_health_check(self, name: str, health: Any) -> None:
        self.metrics.health_checked(name, float(health.latency_s))

    # --- sampling -------------------------------------------------------------------------------

    @hookimpl(trylast=True)
    def runtime_started(self, runtime: Any) -> None:
        self._runtime = runtime
        self._reader = ResourceReader()
        for name in runtime.integrations.integrations:
            self.metrics.restarts.labels(name)  # 0 from the start, so increase() sees the first
        for endpoint, transports in served_routes(runtime.settings).items():
            for transport in transports:
                self.metrics.route_served(endpoint, transport)
        self.sample()
        self._sampler = asyncio.get_running_loop().create_task(
            self._sample_forever(), name="tiffin:metrics-sampler"
        )

    @hookimpl(trylast=True)
    async def runtime_stopping(self, runtime: Any) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def sample(self) -> None:
        """Read every state gauge now."""
        runtime, reader, m = self._runtime, self._reader, self.metrics
        if runtime is None or reader is None:
            return
        m.cpu.set(reader.cpu_percent())
        m.rss.set(reader.resident_memory_bytes())
        for gpu in reader.gpu_memory():
            m.gpu_memory.labels(str(gpu.index)).set(gpu.used_bytes)
            m.gpu_memory_total.labels(str(gpu.index)).set(gpu.total_bytes)
        for model in runtime.models.models.values():
            stats = None if model.engine is None else _stats(model.engine)
            waiting = model.in_flight if stats is None else _queued(stats)
            m.queue_depth.labels(model.id, model.spec.provider).set(waiting)
            # In-process engines only: a runner's stats are a copy each API worker holds.
            batching = batching_stats(stats, runner=False)
            if batching is None:
                m.engines.gone(model.id, model.spec.provider)
            else:
                m.engines.observe(model.id, model.spec.provider, model.engine, batching)
            # Its counters and histograms exist at 0 before its first load and generation, so
            # increase() sees the first one (a series born at 1 has no earlier sample). Models
            # a platform offers later get theirs at the next sample.
            m.model_served(model.id, model.spec.provider)
        self._count_active_models()
        for name, integration in runtime.integrations.integrations.items():
            self._integration_up(name, integration.status.value in UP_VALUES)

    def _integration_up(self, name: str, status_up: bool) -> None:
        """Up: active or degraded, and started. One `degraded` while it waits for a dependency
        has not started and is not up."""
        integrations = self._runtime.integrations.integrations if self._runtime else {}
        started = name not in integrations or integrations[name].initialized
        self.metrics.integration_up.labels(name).set(status_up and started)

    def _count_active_models(self) -> None:
        if self._runtime is not None:
            loaded = [m for m in self._runtime.models.models.values() if m.engine is not None]
            self.metrics.active_models.set(len(loaded))

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sample_interval_s)
            try:
                self.sample()
            except Exception:
                self._log.exception("sampling metrics failed")


def served_routes(settings: Any) -> dict[str, list[str]]:
    """Each route of the route table and the transports that serve it, as the transports
    decide (a column, and the transport on; /v1/ HTTP routes only with `openai_api`)."""
    on = settings.transports
    served: dict[str, list[str]] = {}
    for name, route in settings.handlers.routes.items():
        http = route.http is not None and (on.openai_api or not route.http.path.startswith("/v1/"))
        served[name] = [
            transport
            for transport, serves in (
                ("http", http),
                ("grpc", route.grpc is not None and on.grpc),
                ("ws", route.ws is not None and on.websocket),
                ("graphql", route.graphql is not None and on.graphql),
            )
            if serves
        ]
    return served


def _stats(engine: Any) -> dict[str, Any]:
    try:
        stats = engine.stats()
    except Exception:  # an engine failing to say how it is must not stop the sampling
        return {}
    return stats if isinstance(stats, dict) else {}


def _queued(stats: dict[str, Any]) -> int:
    try:
        return int(stats.get("queued", 0))
    except (TypeError, ValueError):
        return 0
