"""gRPC transport: a `grpc.aio` server built from the route table. Each row with a `grpc`
column (`tiffin.v1.Inference/Chat`) becomes that method, answered by the row's handler through
the Dispatcher, as HTTP does. This module translates only: metadata to Event headers, the
client's deadline and cancellation to the request's, handler errors to status codes; the
messages are translated in runtime/transports/grpc_codec.py.

Beside the routes: server reflection, and the standard `grpc.health.v1` service whose status
follows `runtime.ready` (/readyz). The port is bound with SO_REUSEPORT so each BentoML worker
can serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import structlog
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from runtime.dispatch import Context
from runtime.errors import ConfigError, shown
from runtime.telemetry.logging import bind_request
from runtime.transports import grpc_codec as codec
from runtime.transports.grpc_tracing import server_span

# Imported for their side effect: the tiffin.v1 services join the default descriptor pool.
from runtime.transports.proto.tiffin.v1 import inference_pb2, integrations_pb2
from runtime.types import Event, HandlerError, NdjsonStream, Reply, close

if TYPE_CHECKING:
    from runtime.app import Runtime

PROTO_MODULES = (inference_pb2, integrations_pb2)  # whose services the routes may name
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """The gRPC server of one Runtime: `await start()` binds and serves, `await stop()` ends it."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        host: str | None = None,
        port: int | None = None,
        health_interval_s: float = 1.0,
    ) -> None:
        self.runtime = runtime
        server = runtime.settings.server
        self.address = f"{host or server.host}:{server.grpc_port if port is None else port}"
        self.health = ReadinessHealth(runtime)
        self.health_interval_s = health_interval_s
        self.services = build_services(runtime)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("tiffin.grpc")

    async def start(self) -> int:
        """Bind (SO_REUSEPORT) and start serving; returns the bound port."""
        # HTTP's body limit for each message; a larger one is refused with RESOURCE_EXHAUSTED.
        limit = self.runtime.settings.server.max_body_bytes
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", limit)]
        )
        for name, methods in self.services.items():
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, methods),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(self.address)
        await server.start()
        self._server = server
        await self.health.refresh()
        self._watch = asyncio.create_task(self._follow_readiness())
        self.log.info("grpc serving", address=self.address, port=self.port, services=names)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls; calls in flight get `grace_s` seconds, then are cancelled."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace_s)
            self._server = None

    async def _follow_readiness(self) -> None:
        # Check answers from the live state; this keeps Watch streams current too.
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.health.refresh()


class ReadinessHealth(health.aio.HealthServicer):
    """`grpc.health.v1.Health` for the whole server and each service: SERVING exactly when
    the Runtime is ready (what /readyz answers)."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime
        self.services = ["", *build_service_names(runtime)]

    async def refresh(self) -> None:
        status = _SERVING if self.runtime.ready else _NOT_SERVING
        for service in self.services:
            await self.set(service, status)

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> health_pb2.HealthCheckResponse:
        await self.refresh()  # from the live state, not the last poll
        return await super().Check(request, context)


def build_service_names(runtime: Runtime) -> list[str]:
    """The services the route table puts on gRPC (`tiffin.v1.Inference`, ...)."""
    routes = runtime.settings.handlers.routes.values()
    return sorted({r.grpc.method.split("/")[0] for r in routes if r.grpc is not None})


def build_services(runtime: Runtime) -> dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
    """Method handlers per service, one per route table row with a `grpc` column."""
    services: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}
    for route, row in runtime.settings.handlers.routes.items():
        if row.grpc is None:
            continue
        method = _method(f"handlers.routes.{route}.grpc.method", row.grpc.method)
        rpc = _Rpc(runtime, route, method)
        request_class = message_factory.GetMessageClass(method.input_type)
        options: dict[str, Any] = {
            "request_deserializer": _lenient(request_class),
            "response_serializer": rpc.response_class.SerializeToString,
        }
        if method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(rpc.stream, **options)
        else:
            handler = grpc.unary_unary_rpc_method_handler(rpc.unary, **options)
        services.setdefault(method.containing_service.full_name, {})[method.name] = handler
    return services


class _Undecodable:
    """What a request that is not a valid serialized message becomes: the call answers
    INVALID_ARGUMENT (left to gRPC, garbage bytes would be UNKNOWN, logged as a servicer crash)."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.message = f"request is not a valid {type_name} message: {reason}"


def _lenient(request_class: type[Message]) -> Callable[[bytes], Message | _Undecodable]:
    def deserialize(data: bytes) -> Message | _Undecodable:
        try:
            return request_class.FromString(data)
        except DecodeError as exc:
            return _Undecodable(request_class.DESCRIPTOR.full_name, str(exc).split(": ")[-1])

    return deserialize


def _method(key: str, name: str) -> MethodDescriptor:
    service, _, method = name.partition("/")
    pool = descriptor_pool.Default()
    try:
        found = pool.FindServiceByName(service).methods_by_name[method]
    except KeyError:
        raise ConfigError(key, name, "a method of a service in runtime/transports/proto") from None
    if found.client_streaming:
        raise ConfigError(key, name, "a unary or server-streaming method")
    return found


class _Rpc:
    """One route on gRPC: decode the request, dispatch, encode the result."""

    def __init__(self, runtime: Runtime, route: str, method: MethodDescriptor) -> None:
        self.runtime = runtime
        self.route = route
        self.name = f"{method.containing_service.full_name}/{method.name}"
        self.streaming = method.server_streaming
        self.response_class = message_factory.GetMessageClass(method.output_type)

    def event(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Event:
        headers = {
            key: value
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)
        }
        given = headers.get("x-request-id", "")
        body = codec.request_body(request)
        if self.streaming:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return Event(
            body=body,
            headers=headers,
            transport="grpc",
            route=self.route,
            request_id=given if _REQUEST_ID.match(given) else uuid.uuid4().hex,
        )

    async def call(
        self, request: Message, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Any, Context, Event]:
        if isinstance(request, _Undecodable):
            refused = Event(transport="grpc", route=self.route)
            await self.runtime.dispatcher.refuse(
                self.route, refused, HandlerError(400, request.message)
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        event = self.event(request, context)
        bind_request(event.request_id)
        context.set_trailing_metadata((("x-request-id", event.request_id),))
        dispatcher = self.runtime.dispatcher
        ctx = dispatcher.context(event)
        remaining = context.time_remaining()
        if remaining is not None:  # the client's deadline, if sooner than the server's
            deadline = time.monotonic() + remaining
            ctx.deadline = deadline if ctx.deadline is None else min(ctx.deadline, deadline)
        try:
            result = await dispatcher.dispatch(self.route, event, ctx)
        except HandlerError as exc:
            await _abort(context, exc.status, exc.message, event, exc.headers)
        except asyncio.CancelledError:
            ctx.cancelled.set()  # the client cancelled or its deadline passed
            raise
        except Exception:
            # Never the exception's text: it may carry anything (URLs with credentials...).
            structlog.get_logger("tiffin.grpc").exception("handler failed", route=self.route)
            message = f"internal server error (request id {event.request_id})"
            await _abort(context, 500, message, event)
        if isinstance(result, Reply) and result.status >= 400:
            message = str((result.body or {}).get("error", {}).get("message", "request failed"))
            await _abort(context, result.status, message, event)
        return result, ctx, event

    def _span(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return server_span(self.runtime.tracing, self.name, metadata, context)

    async def unary(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with self._span(context):
            result, _, _ = await self.call(request, context)
            body = result.body if isinstance(result, Reply) else result
            return codec.response_message(body, self.response_class)

    async def stream(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        with self._span(context):
            await self._stream(request, context)

    async def _stream(self, request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        result, ctx, event = await self.call(request, context)
        if isinstance(result, NdjsonStream):
            result = result.items
        if isinstance(result, Reply):
            result = result.body
        messages = codec.stream_messages(result, self.response_class)
        try:
            async for message in messages:
                await context.write(message)
        except HandlerError as exc:
            await _abort(context, exc.status, exc.message, event)
        except asyncio.CancelledError:
            ctx.cancelled.set()
            raise
        except Exception:
            structlog.get_logger("tiffin.grpc").exception("stream failed", route=self.route)
            await _abort(context, 500, "internal server error while streaming", event)
        finally:
            # However the call ended (done, cancelled, deadline): closing the handler's
            # stream stops the generation and frees the engine.
            await messages.aclose()
            await _close(result)


async def _close(result: Any) -> None:
    await close(result)


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    status: int,
    message: str,
    event: Event,
    headers: Mapping[str, str] | None = None,
) -> NoReturn:
    trailers = [("x-request-id", event.request_id)]
    if headers and "retry-after" in headers:  # a rate limit says when to come back
        trailers.append(("retry-after", headers["retry-after"]))
    # A status message travels in a header (8 KiB of metadata by default): a longer one would
    # reach the client as RESOURCE_EXHAUSTED instead of its code.
    await context.abort(codec.status_code(status), shown(message, 500), tuple(trailers))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
