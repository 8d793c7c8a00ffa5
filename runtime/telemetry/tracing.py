"""OpenTelemetry tracing for one Runtime: its own TracerProvider (never the process-global one),
exporters and sampler from the config, and the few span operations the request path uses.

    tracing = Tracing(TracingSettings(enabled=True, exporters=["otlp_http"]))
    tracing.start()                                  # exporters and batch processors
    with tracing.span("model_inference", {"model": "llama2-7b"}):
        ...
    await tracing.shutdown()                         # flushes what is still queued

Disabled (the default), every method is a cheap no-op and nothing is built, so the request path
costs one attribute check. Spans go through a BatchSpanProcessor: ending one only queues it;
a background thread exports.

Why a provider of our own: under `bentoml serve`, BentoML wraps the mounted app in its own
OpenTelemetry middleware with its own provider (sampling ratio 0 unless BentoML's config says
otherwise: its server span records but is never sampled nor exported). Our server span starts
from the request's `traceparent` alone (see runtime/transports/http_tracing.py), so Tiffin's traces
neither hang off that span nor inherit its "not sampled" flag. Setting the global provider
would fight BentoML's configuration and leak between Runtimes in one process (tests).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from runtime.errors import ConfigError
from runtime.types import Closed, Stream

if TYPE_CHECKING:
    import httpx
    from opentelemetry.context import Context

T = TypeVar("T")

# Exporter names: `otlp` picks its protocol from `protocol` (OTEL_EXPORTER_OTLP_PROTOCOL).
EXPORTERS = ("otlp", "otlp_http", "otlp_grpc", "console", "none")
PROTOCOLS = {"http/protobuf": "otlp_http", "grpc": "otlp_grpc"}
DEFAULT_ENDPOINTS = {"otlp_http": "http://localhost:4318", "otlp_grpc": "http://localhost:4317"}


@dataclass
class TracingSettings:
    """Resolved tracing settings (see runtime/integrations/opentelemetry.py for where they come
    from: the opentelemetry integration's settings, else `telemetry.*` and OTEL_* variables)."""

    enabled: bool = False
    exporters: list[str] = field(default_factory=lambda: ["otlp"])
    protocol: str = "http/protobuf"  # for `otlp`: http/protobuf or grpc
    endpoint: str = ""  # base URL (`/v1/traces` is added for HTTP); "" = the exporter's default
    headers: dict[str, str] = field(default_factory=dict)  # {} = OTEL_EXPORTER_OTLP_HEADERS
    timeout_s: float = 10.0
    sampling_ratio: float = 1.0
    service_name: str = "tiffin"
    service_version: str = ""  # "" = Tiffin's package version
    environment: str = ""  # deployment.environment; "" = the config's `env`
    # Requests to these paths get no server span (probes and scrapes would drown the traces).
    excluded_paths: list[str] = field(default_factory=lambda: ["/livez", "/readyz", "/metrics"])
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_ms: int = 1000

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "tracing") -> TracingSettings:
        """Build from a settings mapping (YAML values, env strings), naming a bad key."""
        known = set(cls.__dataclass_fields__)
        settings = cls()
        for key, value in values.items():
            if key not in known:
                continue  # the integration's own keys (check_endpoint...) live beside these
            setattr(settings, key, _coerce(f"{where}.{key}", getattr(settings, key), value))
        settings.exporters = exporter_names(settings.exporters, f"{where}.exporters")
        settings.protocol = settings.protocol or "http/protobuf"
        if settings.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol", settings.protocol, "http/protobuf or grpc")
        if not 0.0 <= settings.sampling_ratio <= 1.0:
            raise ConfigError(f"{where}.sampling_ratio", settings.sampling_ratio, "0.0 to 1.0")
        return settings

    @staticmethod
    def environment_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The settings that OTEL_* variables give (as the integration's YAML reads them)."""
        env = os.environ if environ is None else environ
        return {
            "protocol": env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            "endpoint": env.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            "sampling_ratio": env.get("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            "service_name": env.get("OTEL_SERVICE_NAME", "tiffin"),
        }

    def exporter_kinds(self) -> list[str]:
        """The exporters to build: `otlp` resolved to its protocol, `none` dropped."""
        kinds = [PROTOCOLS[self.protocol] if name == "otlp" else name for name in self.exporters]
        return [kind for kind in dict.fromkeys(kinds) if kind != "none"]

    def endpoint_of(self, kind: str) -> str:
        """Where an OTLP exporter sends: HTTP the full `/v1/traces` URL, gRPC the address."""
        if kind == "otlp_http" and not self.endpoint:
            full = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            if full:
                return full
        base = (self.endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").rstrip("/")
        base = base or DEFAULT_ENDPOINTS[kind]
        if kind == "otlp_http" and not base.endswith("/v1/traces"):
            return f"{base}/v1/traces"
        return base


def exporter_names(value: Any, where: str = "exporters") -> list[str]:
    """Exporter names from a list or a comma-separated string, checked."""
    names = value.split(",") if isinstance(value, str) else list(value or [])
    cleaned = [str(name).strip().lower() for name in names if str(name).strip()]
    for name in cleaned:
        if name not in EXPORTERS:
            raise ConfigError(where, name, f"one of: {', '.join(EXPORTERS)}")
    return cleaned


def parse_headers(value: Any, where: str = "headers") -> dict[str, str]:
    """OTLP headers from a mapping or OTel's `k=v,k2=v2` form (values URL-encoded)."""
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    headers: dict[str, str] = {}
    for item in str(value or "").split(","):
        if not item.strip():
            continue
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(where, item, "name=value pairs separated by commas")
        headers[unquote(name.strip()).lower()] = unquote(text.strip())
    return headers


def _coerce(key: str, default: Any, value: Any) -> Any:
    """`value` as the type of the field's default (settings may come from env strings)."""
    if isinstance(default, dict):
        return parse_headers(value, key)
    if isinstance(default, list):
        return value.split(",") if isinstance(value, str) else list(value or [])
    if isinstance(default, str):
        return "" if value is None else str(value)
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(key, value, f"a {type(default).__name__}") from None


@dataclass
class ExportRecord:
    """How one exporter has fared: what the integration's health check reports."""

    kind: str
    endpoint: str = ""
    exported: int = 0  # spans
    failed: int = 0  # spans
    last_ok_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None

    @property
    def failing(self) -> bool:
        """The latest export attempt failed."""
        return self.last_failure_at is not None and (
            self.last_ok_at is None or self.last_failure_at > self.last_ok_at
        )


class RecordingExporter(SpanExporter):
    """Passes spans to an exporter and notes each batch's outcome in an ExportRecord."""

    def __init__(self, exporter: SpanExporter, record: ExportRecord) -> None:
        self.exporter = exporter
        self.record = record
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
            error = None if result is SpanExportResult.SUCCESS else "the exporter reported failure"
        except Exception as exc:  # an exporter bug must not kill the batch thread
            result, error = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        with self._lock:
            if error is None:
                self.record.exported += len(spans)
                self.record.last_ok_at = time.time()
            else:
                self.record.failed += len(spans)
                self.record.last_failure_at = time.time()
                self.record.last_error = error
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class Tracing:
    """One Runtime's tracing: a TracerProvider with its exporters, or a no-op when disabled."""

    def __init__(self, settings: TracingSettings | None = None) -> None:
        self.settings = settings or TracingSettings()
        self.enabled = self.settings.enabled
        self.exports: list[ExportRecord] = []
        self.provider: TracerProvider | None = None
        self.excluded_paths = frozenset(self.settings.excluded_paths)
        self._started = False
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        s = self.settings
        version = _version()
        resource = Resource.create(
            {
                "service.name": s.service_name or "tiffin",
                "service.version": s.service_version or version,
                "deployment.environment.name": s.environment,
                # The pre-1.27 name, which many backends still group by.
                "deployment.environment": s.environment,
            }
        )
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(s.sampling_ratio)),
            resource=resource,
            shutdown_on_exit=False,  # Runtime.stop() shuts it down (and tests build many)
        )
        self.tracer = self.provider.get_tracer("tiffin", version)

    @classmethod
    def disabled(cls) -> Tracing:
        return cls()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Build the exporters and their batch processors (once). Construction stays cheap:
        `python -m runtime plan` and BentoML's import build a Runtime they never start."""
        if self.provider is None or self._started:
            return
        self._started = True
        s = self.settings
        for kind in s.exporter_kinds():
            record = ExportRecord(kind, s.endpoint_of(kind) if kind in DEFAULT_ENDPOINTS else "")
            self.add_exporter(RecordingExporter(_build_exporter(kind, s), record))
            self.exports.append(record)

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Export spans through `exporter` too (batched), e.g. an in-memory one in tests."""
        if self.provider is None:
            raise RuntimeError("tracing is disabled; enable telemetry.tracing first")
        s = self.settings
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=s.max_queue_size,
                schedule_delay_millis=s.schedule_delay_ms,
                max_export_batch_size=s.max_export_batch_size,
                export_timeout_millis=s.timeout_s * 1000,
            )
        )

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export every ended span now (blocking); False if that did not finish in time."""
        if self.provider is None:
            return True
        return self.provider.force_flush(int(timeout_s * 1000))

    async def shutdown(self) -> None:
        """Flush and stop the exporters (in a thread: flushing is blocking I/O)."""
        if self.provider is None:
            return
        provider, self.provider = self.provider, None
        await asyncio.to_thread(provider.shutdown)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "enabled": self.enabled,
            "exporters": [vars(record).copy() for record in self.exports],
            "sampling_ratio": s.sampling_ratio,
            "service_name": s.service_name,
            "environment": s.environment,
        }

    # --- spans ----------------------------------------------------------------------------------

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> AbstractContextManager[Span]:
        """A span around a block, current inside it; an exception marks it ERROR."""
        if not self.enabled:
            return nullcontext(trace.INVALID_SPAN)
        return self._span(name, attributes, kind)

    @contextmanager
    def _span(
        self, name: str, attributes: Mapping[str, Any] | None, kind: SpanKind
    ) -> Iterator[Span]:
        with self.tracer.start_as_current_span(
            name,
            kind=kind,
            attributes=_clean(attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                _note(span, exc)
                raise

    def start_span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        context: Context | None = None,
    ) -> Span:
        """A span the caller ends (`end`), e.g. one that outlives a call, around a stream.
        Inside a trace that is not sampled, the parent itself stands in (a non-recording span
        that still carries the trace context): the sampler would drop the child anyway, and
        this skips its ids and sampling on every hop of an unsampled request."""
        parent = trace.get_current_span(context)
        parent_context = parent.get_span_context()
        if parent_context.is_valid and not parent_context.trace_flags.sampled:
            return trace.NonRecordingSpan(parent_context)
        return self.tracer.start_span(
            name, context=context, kind=kind, attributes=_clean(attributes)
        )

    @staticmethod
    @contextmanager
    def current(span: Span) -> Iterator[Span]:
        """Make `span` the parent of spans started inside the block (it is not ended here).
        Never hold this across a `yield` of an async generator: its context would leak."""
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            yield span

    @staticmethod
    def end(span: Span, error: BaseException | None = None) -> None:
        """End `span`; with an error, record it and mark the span ERROR (a cancellation or a
        stream closed early is not an error: it is noted as `tiffin.cancelled`)."""
        if error is not None:
            _note(span, error)
        span.end()

    def stream(self, items: AsyncIterator[T], span: Span) -> Stream[T]:
        """`items`, with `span` ended when the stream ends, fails or is closed."""
        return SpanStream(items, span)

    # --- outgoing HTTP --------------------------------------------------------------------------

    def instrument_http_client(self, client: httpx.AsyncClient) -> None:
        """Give `client` a span per request (a child of the current span) and send the trace
        context (`traceparent`) with each, so the upstream continues the trace."""
        if self.provider is None:
            return
        from runtime.telemetry.outgoing import instrument

        instrument(client, self.tracer)


def fail(span: Span, error: BaseException) -> None:
    """Record `error` on `span` and mark it ERROR, with semconv's `error.type`."""
    span.record_exception(error)
    code = getattr(error, "code", None)
    span.set_attribute("error.type", str(code) if code else type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:500] or type(error).__name__))


def _note(span: Span, error: BaseException) -> None:
    if not span.is_recording():
        return
    if isinstance(error, GeneratorExit | asyncio.CancelledError | Closed):
        span.set_attribute("tiffin.cancelled", True)
    else:
        fail(span, error)


class SpanStream(Stream[T]):
    """A Stream that ends its span however the stream ends (ran out, raised, closed)."""

    def __init__(self, items: AsyncIterator[T], span: Span) -> None:
        super().__init__(items, self._ended)
        self._span = span

    async def _ended(self, error: BaseException | None) -> None:
        Tracing.end(self._span, error)


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes OpenTelemetry accepts: None values dropped, others as they are or str."""
    if not attributes:
        return None
    return {
        k: v if isinstance(v, _ALLOWED) else str(v) for k, v in attributes.items() if v is not None
    }


_ALLOWED = (str, bool, int, float, list, tuple)


def _build_exporter(kind: str, settings: TracingSettings) -> SpanExporter:
    headers = settings.headers or None  # None: the exporter reads OTEL_EXPORTER_OTLP_HEADERS
    if kind == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(
            endpoint=settings.endpoint_of(kind), headers=headers, timeout=settings.timeout_s
        )
    if kind == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        endpoint = settings.endpoint_of(kind)
        return GrpcSpanExporter(
            endpoint=endpoint,
            insecure=endpoint.startswith("http://"),
            headers=headers,
            timeout=settings.timeout_s,
        )
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    raise ConfigError("tracing.exporters", kind, f"one of: {', '.join(EXPORTERS)}")


def _version() -> str:
    try:
        return metadata.version("tiffin")
    except metadata.PackageNotFoundError:
        return "0.0.0"
