"""Client spans for the integrations' outgoing HTTP calls, and the trace context they carry.

An httpx transport wrapper rather than opentelemetry-instrumentation-httpx: that one costs about
a third more per proxied request (it copies and normalises every header, builds metric
attributes and wraps through wrapt), and the proxy path's budget is tight. This one starts a
CLIENT span only inside a recorded span (a request's; a health check with no request around it
sends nothing and costs nothing), injects `traceparent` (and `baggage`, per the process's
propagators) into the request, and ends the span when the response headers arrive.
"""

from __future__ import annotations

import httpx
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import SpanKind, Status, StatusCode

from runtime.telemetry.tracing import fail

DEFAULT_PORTS = {"http": 80, "https": 443}


class TracingTransport(httpx.AsyncBaseTransport):
    """Wraps an httpx transport: one CLIENT span per request, with HTTP semantic-convention
    attributes, a child of the current span."""

    def __init__(self, inner: httpx.AsyncBaseTransport, tracer: trace.Tracer) -> None:
        self.inner = inner
        self.tracer = tracer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not trace.get_current_span().is_recording():
            return await self.inner.handle_async_request(request)
        url = request.url
        port = f":{url.port}" if url.port else ""
        span = self.tracer.start_span(
            request.method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": request.method,
                "server.address": url.host,
                "server.port": url.port or DEFAULT_PORTS.get(url.scheme, 80),
                # No user-info and no query string: either may carry credentials.
                "url.full": f"{url.scheme}://{url.host}{port}{url.path}",
            },
        )
        inject(request.headers, context=trace.set_span_in_context(span))
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException as exc:
            fail(span, exc)
            span.end()
            raise
        status = response.status_code
        span.set_attribute("http.response.status_code", status)
        if status >= 400:  # a client span's 4xx is an error too (HTTP semantic conventions)
            span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))
        span.end()
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def instrument(client: httpx.AsyncClient, tracer: trace.Tracer) -> None:
    """Route `client`'s requests through a TracingTransport (once)."""
    transport = client._transport
    if not isinstance(transport, TracingTransport):
        client._transport = TracingTransport(transport, tracer)
