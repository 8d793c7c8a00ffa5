"""opentelemetry: Tiffin's tracing, as the platform guide presents it.

    otel = manager.get_integration("opentelemetry")
    with otel.create_span("model_inference", {"model": "llama2-7b"}):
        result = await model.generate(prompt)

The spans themselves are made by the Runtime's `Tracing` (runtime/telemetry/tracing.py): one
TracerProvider per Runtime, built when the Runtime is. How config turns into it
(`tracing_settings`):

- tracing is on when `telemetry.tracing` is true (OPENTELEMETRY_ENABLED in staging and prod)
  or when this integration is selected and enabled: `integrations=opentelemetry` is enough;
- with this integration selected, its `settings` say where spans go (exporters, endpoint,
  headers, sampling, resource); without it, `telemetry.exporters` names the exporters and the
  standard OTEL_* variables the rest;
- an empty exporter list falls back to `telemetry.exporters` (dev: console, staging and prod:
  otlp, test: none).

The integration itself holds no spans: it checks that the collector is reachable (OTLP/HTTP:
an empty export; OTLP/gRPC: a TCP connect) and reports how exports fare in its health.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
from opentelemetry.trace import Span

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig, TiffinConfig
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.settings import defaults_of
from runtime.secrets import MASK, redact
from runtime.telemetry.tracing import TracingSettings, exporter_names

TARGET = "runtime.integrations.opentelemetry.OpenTelemetryIntegration"


@dataclass
class OpenTelemetrySettings:
    """`integrations.opentelemetry.settings`: TracingSettings' fields (runtime/telemetry/tracing.py
    holds their meaning and checks their values), less `enabled` (selecting the integration turns
    tracing on), plus `check_endpoint`."""

    # A list or OTel's comma-separated string; empty: telemetry.exporters.
    exporters: Any = field(default_factory=list)
    protocol: str = "http/protobuf"
    endpoint: str = ""
    # A mapping or OTel's `k=v,k2=v2` string; empty: OTEL_EXPORTER_OTLP_HEADERS.
    headers: Any = field(default_factory=dict)
    timeout_s: float = 10.0
    sampling_ratio: float = 1.0
    service_name: str = "tiffin"
    service_version: str = ""
    environment: str = ""
    excluded_paths: list[str] = field(default_factory=lambda: ["/livez", "/readyz", "/metrics"])
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_ms: int = 1000
    check_endpoint: bool = True  # health checks reach the collector


DEFAULT_OPENTELEMETRYINTEGRATION_CONFIG = IntegrationConfig(
    _target_=TARGET,
    name="opentelemetry",
    type=IntegrationType.monitoring,
    priority=10,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=2, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(OpenTelemetrySettings),
)


def tracing_settings(config: TiffinConfig) -> TracingSettings:
    """The tracing settings a config asks for (see the module docstring for the rules)."""
    telemetry = config.telemetry
    selected = next(
        (
            (name, c)
            for name, c in config.integrations.items()
            if c._target_ == TARGET and c.enabled
        ),
        None,
    )
    fallback = [
        e for e in telemetry.exporters if e in ("otlp", "otlp_http", "otlp_grpc", "console")
    ]
    if selected is None:
        values: dict[str, Any] = {**TracingSettings.environment_values(), "exporters": fallback}
        where = "telemetry"
    else:
        name, integration = selected
        values = dict(integration.settings)
        where = f"integrations.{name}.settings"
        if not exporter_names(values.get("exporters"), f"{where}.exporters"):
            values["exporters"] = fallback
    settings = TracingSettings.from_mapping(values, where)
    settings.enabled = telemetry.tracing or selected is not None
    settings.environment = settings.environment or config.env
    return settings


class OpenTelemetryIntegration(BaseIntegration):
    """Spans on demand (`create_span`) and the health of the trace export."""

    settings_schema: ClassVar[type[Any]] = OpenTelemetrySettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.check_endpoint = bool(self.settings["check_endpoint"])
        self.timeout = float(self.settings["timeout_s"])

    def create_span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[Span]:
        """A span around a `with` block, a child of the current one (the request's, inside a
        handler); an exception inside marks it ERROR. A no-op while tracing is off."""
        return self.tracing.span(name, attributes)

    async def initialize(self) -> None:
        if not self.tracing.enabled:
            raise RuntimeError(
                "tracing is off in this runtime (telemetry.tracing=false and no tracing runtime "
                "was given to this integration)"
            )
        await self._reach_collectors()

    async def health_check(self) -> Health:
        await self._reach_collectors()
        records = self.tracing.exports
        data = {"exporters": [vars(r).copy() for r in records]}  # (Health masks URL secrets)
        if not records:
            return Health(True, "tracing on, exporting nowhere (no exporter configured)", data=data)
        failing = [r for r in records if r.failing]
        summary = ", ".join(f"{r.kind}: {r.exported} exported, {r.failed} failed" for r in records)
        if failing:
            worst = failing[0]
            detail = f"last export to {worst.kind} failed ({worst.last_error}); {summary}"
            return Health(True, detail, data=data, degraded=True)
        return Health(True, summary, data=data)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["settings"] = self._public(described["settings"])
        described["tracing"] = redact(self.tracing.describe())
        return described

    async def _reach_collectors(self) -> None:
        """Raise unless every OTLP collector answers (when `check_endpoint` is on)."""
        if not self.check_endpoint:
            return
        settings = self.tracing.settings
        for kind in settings.exporter_kinds():
            if kind == "otlp_http":
                await self._post_empty(settings.endpoint_of(kind), settings.headers)
            elif kind == "otlp_grpc":
                await self._connect(settings.endpoint_of(kind))

    async def _post_empty(self, url: str, headers: Mapping[str, str]) -> None:
        # An empty ExportTraceServiceRequest is zero bytes of protobuf: a collector accepts it
        # and exports nothing.
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            try:
                response = await client.post(
                    url,
                    content=b"",
                    headers={**headers, "content-type": "application/x-protobuf"},
                )
            except httpx.HTTPError as exc:
                raise RuntimeError(
                    f"OTLP collector at {url} cannot be reached: {type(exc).__name__}: {exc}"
                ) from None
        if not response.is_success:
            raise RuntimeError(f"OTLP collector at {url} answered {response.status_code}")

    async def _connect(self, endpoint: str) -> None:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        host, port = parts.hostname or "localhost", parts.port or 4317
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise RuntimeError(
                f"OTLP/gRPC collector at {host}:{port} cannot be reached: {exc}"
            ) from None
        writer.close()
        await writer.wait_closed()

    @staticmethod
    def _public(values: dict[str, Any]) -> dict[str, Any]:
        """OTLP headers usually carry credentials: show their names only."""
        headers = values.get("headers")
        if isinstance(headers, Mapping) and headers:
            values = {**values, "headers": dict.fromkeys(headers, MASK)}
        elif isinstance(headers, str) and headers:
            values = {**values, "headers": MASK}
        return values
