"""The server span of each HTTP request: an ASGI middleware that `create_app` adds when tracing
is on (when it is off, there is no middleware at all).

Its own, not opentelemetry-instrumentation-asgi's: that one costs about three times as much per
request (and a span per streamed chunk unless told otherwise), and under `bentoml serve` it
would start from BentoML's span. This one starts from the request's `traceparent` alone, so a
Tiffin trace is either a continuation of the caller's or a new one, never a child of BentoML's
unexported, unsampled server span. Attributes follow the HTTP semantic conventions.
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.telemetry.tracing import Tracing, fail

Headers = list[tuple[bytes, bytes]]


class _HeaderGetter(Getter[Headers]):
    """Reads propagation headers straight from the ASGI scope's header list."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_GETTER = _HeaderGetter()


class TracingMiddleware:
    """Wraps each HTTP request in a SERVER span named `{method} {route}`, current for the
    whole request (streamed bodies included), ERROR when it fails or answers 5xx."""

    def __init__(self, app: ASGIApp, tracing: Callable[[], Tracing]) -> None:
        self.app = app
        self.tracing_now = tracing  # the Runtime's, which an apply may replace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracing = self.tracing_now()
        if (
            not tracing.enabled
            or scope["type"] != "http"
            or scope["path"] in tracing.excluded_paths
        ):
            await self.app(scope, receive, send)
            return
        headers: Headers = scope.get("headers") or []
        # An empty context, not the current one: under BentoML that holds BentoML's span.
        parent = extract(headers, context=otel_context.Context(), getter=_GETTER)
        method = scope["method"]
        span = tracing.start_span(method, kind=SpanKind.SERVER, context=parent)
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": method,
                    "url.path": scope["path"],
                    "url.scheme": scope.get("scheme", "http"),
                }
            )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 0
        failed = False

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            failed = True
            if span.is_recording():
                fail(span, exc)
            raise
        finally:
            otel_context.detach(token)
            if span.is_recording():
                _finish(span, scope, method, status, failed)
            span.end()


def _finish(span: trace.Span, scope: Scope, method: str, status: int, failed: bool) -> None:
    route = getattr(scope.get("route"), "path", None)
    if route and route != "/{path:path}":  # the catch-all answers 404/405: no route to name
        span.set_attribute("http.route", route)
        span.update_name(f"{method} {route}")
    request_id = (scope.get("state") or {}).get("request_id")
    if request_id:
        span.set_attribute("tiffin.request_id", request_id)
    if status:
        span.set_attribute("http.response.status_code", status)
        if status >= 500 and not failed:  # (an exception already said what went wrong)
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
