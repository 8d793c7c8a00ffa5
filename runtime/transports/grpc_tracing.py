"""The server span of each gRPC call, as `transports/tracing.py` gives HTTP requests one: named
`package.Service/Method`, started from the call's `traceparent` metadata alone (a new trace
otherwise), current for the whole call (a stream included), with the RPC semantic conventions'
attributes. No span work at all when tracing is off."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from runtime.telemetry.tracing import Tracing, fail

# Server-side codes that mean the server failed (the RPC semantic conventions' list).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


@contextmanager
def server_span(
    tracing: Tracing,
    method: str,
    metadata: Mapping[str, str],
    context: grpc.aio.ServicerContext[Any, Any],
) -> Iterator[None]:
    if not tracing.enabled:
        yield
        return
    parent = extract(dict(metadata), context=otel_context.Context())
    service, _, name = method.rpartition("/")
    span = tracing.start_span(method, kind=SpanKind.SERVER, context=parent)
    if span.is_recording():
        span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    except BaseException as exc:
        code = context.code() if hasattr(context, "code") else None
        if span.is_recording():
            if isinstance(code, grpc.StatusCode):
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, str(code.name)))
            elif not isinstance(exc, grpc.aio.AbortError):
                fail(span, exc)
        raise
    else:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    finally:
        otel_context.detach(token)
        span.end()
