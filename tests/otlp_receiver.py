"""A small OTLP/HTTP trace receiver for tests, written from the OTLP specification
(https://opentelemetry.io/docs/specs/otlp/#otlphttp): `POST /v1/traces` with a protobuf
`ExportTraceServiceRequest` (optionally gzip-compressed), answered with an
`ExportTraceServiceResponse`. Every span is decoded into a plain `ReceivedSpan`.

`reject_spans = True` makes it answer 400 to exports that carry spans (an empty export, the
integration's reachability check, still gets 200), as a collector refusing data would.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.thread_server import ThreadServer

PROTOBUF = "application/x-protobuf"


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_INTERNAL, ...
    attributes: dict[str, Any]
    status: str  # STATUS_CODE_UNSET, STATUS_CODE_OK, STATUS_CODE_ERROR
    resource: dict[str, Any]
    scope: str
    events: list[str] = field(default_factory=list)


class OtlpReceiver(ThreadServer):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.exports: list[dict[str, str]] = []  # the headers of every POST, empty ones too
        self.reject_spans = False
        self._lock = threading.Lock()

    def start(self) -> None:
        self.serve(Starlette(routes=[Route("/v1/traces", self.traces, methods=["POST"])]), "OTLP")

    async def traces(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        if request.headers.get("content-type") != PROTOBUF:
            return Response(b"", status_code=415)
        export = ExportTraceServiceRequest.FromString(body)
        spans = list(_decode(export))
        with self._lock:
            self.exports.append(dict(request.headers))
            if spans and self.reject_spans:
                return Response(b"", status_code=400)
            self.spans += spans
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type=PROTOBUF)

    def wait_for(self, names: set[str], within: float = 15.0) -> list[ReceivedSpan]:
        """The spans received once every name in `names` has arrived."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if names <= {span.name for span in spans}:
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans {names} never arrived; got {[s.name for s in self.spans]}")


def _decode(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    found = []
    for resource_spans in export.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.SpanKind.Name(span.kind),
                        attributes=_attributes(span.attributes),
                        status=span.status.StatusCode.Name(span.status.code),
                        resource=resource,
                        scope=scope_spans.scope.name,
                        events=[event.name for event in span.events],
                    )
                )
    return found


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None
