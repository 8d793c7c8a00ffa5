"""HTTP transport: a FastAPI app built from the route table. It decodes a request into an Event,
hands it to the Dispatcher, and encodes the result (dict or Reply -> JSON, async iterator ->
server-sent events). Every error, including 404/405 and bad JSON, is JSON in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.dispatch import parse_json
from runtime.errors import shown
from runtime.telemetry.logging import bind_request
from runtime.transports import graphql
from runtime.transports.cors import install_cors
from runtime.transports.http_tracing import TracingMiddleware
from runtime.transports.openapi import install_openapi, route_openapi
from runtime.transports.ws import mount_websockets
from runtime.types import (
    Event,
    EventStream,
    FileBody,
    HandlerError,
    NdjsonStream,
    Reply,
    UploadedFile,
    close,
)

if TYPE_CHECKING:
    from runtime.app import Runtime

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error = HandlerError(
        status, message, type=_ERROR_TYPES.get(status, "server_error"), code=code, param=param
    )
    return JSONResponse(error.to_dict(), status_code=status, headers=headers)


class RequestContextMiddleware:
    """Gives each request an id (honouring a sane `x-request-id`), binds it to the logs, echoes
    it in the response, and refuses bodies over `max_body_bytes` with 413 before reading them
    (over `upload_limits[path]` on the paths that take uploads)."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, upload_limits: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_limits = dict(upload_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        bind_request(request_id)
        limit = self.upload_limits.get(scope.get("path", ""), self.max_body_bytes)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(scope, receive, send, request_id, limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            await self._too_large(scope, receive, send, request_id, limit)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, limit: int
    ) -> None:
        response = error_response(
            413,
            f"request body is larger than the limit of {limit} bytes",
            code="request_too_large",
            headers={"x-request-id": request_id},
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(runtime: Runtime) -> FastAPI:
    """The HTTP app of one Runtime: one route per row of the route table with an `http` column."""
    app = FastAPI(
        title="Tiffin", version="0.1.0", docs_url="/docs", redoc_url=None, **_no_native_telemetry()
    )
    app.state.runtime = runtime
    openai_api = runtime.settings.transports.openai_api
    schemas: dict[str, Any] = {}
    for name, route in runtime.settings.handlers.routes.items():
        if route.http is None:
            continue
        if not openai_api and route.http.path.startswith("/v1/"):
            continue  # OPENAI_API_ENABLED=false: the OpenAI-compatible routes are off
        app.add_api_route(
            route.http.path,
            _endpoint(runtime, name),
            methods=[route.http.method.upper()],
            name=name,
            description=route.description,
            openapi_extra=route_openapi(
                route.http.path,
                getattr(runtime.handlers.get(route.handler), "request_body", None),
                schemas,
            ),
        )
    if runtime.settings.transports.websocket:
        mount_websockets(app, runtime)
    app.add_api_route("/metrics", _metrics(runtime), methods=["GET"], include_in_schema=False)
    if runtime.settings.transports.graphql:  # GRAPHQL_ENABLED
        app.include_router(graphql.create_router(runtime), prefix=graphql.PATH)
    # Last route: every other path and method answers in JSON too, also when BentoML mounts this
    # app (it only forwards paths that some route of the app matches).
    app.add_api_route(FALLBACK_PATH, _fallback(app), methods=_METHODS, include_in_schema=False)
    _install_error_handlers(app)
    install_openapi(app, schemas)
    install_cors(app, runtime.settings.server.cors)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=runtime.settings.server.max_body_bytes,
        upload_limits={
            route.http.path: route.http.max_body_bytes
            for route in runtime.settings.handlers.routes.values()
            if route.http is not None and route.http.max_body_bytes > 0
        },
    )
    # Outermost: the server span covers everything, 413s too. Always there, as an apply may
    # turn tracing on; with tracing off it only passes requests on.
    app.add_middleware(TracingMiddleware, tracing=lambda: runtime.tracing)
    return app


_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# The last route: any path no other route serves (answered 404 or 405 in JSON).
FALLBACK_PATH = "/{path:path}"


def _no_native_telemetry() -> dict[str, Any]:
    """Newer FastAPI traces and measures requests itself as soon as a process-global
    OpenTelemetry provider exists (auto-instrumentation sets one). Tiffin's own spans
    (runtime/transports/http_tracing.py) and metrics cover that; twice would cost twice."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _fallback(app: FastAPI) -> Callable[[Request], Awaitable[Response]]:
    async def not_found(request: Request) -> Response:
        allowed = sorted(
            method
            for route in app.router.routes
            if isinstance(route, APIRoute)
            and route.name != "not_found"
            and route.path_regex.match(request.url.path)
            for method in (route.methods or ())
        )
        if allowed:
            status = 405
            message = f"method {request.method} is not allowed on {shown(request.url.path)}"
            headers = {"allow": ", ".join(allowed)}
        else:
            status, headers = 404, {}
            message = f"no route for {request.method} {shown(request.url.path)}"
        if request.url.path.startswith("/api/"):  # Ollama's API: its clients read its shape
            return JSONResponse({"error": message}, status_code=status, headers=headers)
        return error_response(status, message, headers=headers)

    return not_found


def _metrics(runtime: Runtime) -> Callable[[Request], Awaitable[Response]]:
    """Prometheus' text format: under BentoML's workers, every worker's samples from the
    multiprocess files (BentoML's own /metrics is off, see bentos/traffic_metrics.py)."""

    async def metrics(request: Request) -> Response:
        body, content_type = runtime.metrics.exposition()
        return Response(body, media_type=content_type)

    return metrics


def _endpoint(runtime: Runtime, route: str) -> Callable[[Request], Awaitable[Response]]:
    dispatcher = runtime.dispatcher
    # The handler's own error shape (Ollama's), for what is refused before it runs.
    render = getattr(dispatcher.handlers.get(dispatcher.routes.get(route, "")), "error_body", None)

    async def endpoint(request: Request) -> Response:
        try:
            return await answer(request)
        except HandlerError as exc:
            if render is None:
                raise
            return JSONResponse(render(exc), status_code=exc.status, headers=exc.headers)

    async def answer(request: Request) -> Response:
        event = Event(
            headers=request.headers,
            path_params=request.path_params,
            query=request.query_params,
            transport="http",
            route=route,
            request_id=request.state.request_id,
        )
        try:
            event.body = await _read_body(request)
        except HandlerError as exc:  # not JSON: still a request to this route, and an error
            await dispatcher.refuse(route, event, exc)
            raise
        ctx = dispatcher.context(event)
        work = asyncio.ensure_future(dispatcher.dispatch(route, event, ctx))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            # The client went away before the answer was ready: stop the work (a generation
            # frees its engine) instead of finishing it for nobody.
            ctx.cancelled.set()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return Response(status_code=499)
        return encode(work.result())

    endpoint.__name__ = route
    return endpoint


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request) -> Any:
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return None  # (a DELETE may carry one: Ollama's /api/delete does)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _read_form(request)
    raw = await request.body()
    if not raw:
        return None
    return parse_json(raw, "request body")


async def _read_form(request: Request) -> dict[str, Any]:
    """A multipart body as a dict: text fields as strings, file parts as UploadedFile."""
    try:
        form = await request.form(max_files=4, max_fields=32)
    except (StarletteHTTPException, MultiPartException) as exc:
        detail = getattr(exc, "detail", None) or getattr(exc, "message", "")
        raise HandlerError(
            400, f"request body is not valid multipart/form-data: {detail}", code="invalid_form"
        ) from None
    body: dict[str, Any] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                body[name] = value
            else:
                content = await value.read()
                body[name] = UploadedFile(
                    value.filename or "upload",
                    content,
                    value.content_type or "application/octet-stream",
                )
    finally:
        await form.close()
    return body


def encode(result: Any) -> Response:
    """Turn a handler's result into an HTTP response."""
    if isinstance(result, Response):
        return result
    if isinstance(result, FileBody):
        return Response(result.content, media_type=result.media_type)
    if isinstance(result, Reply):
        return FastJSONResponse(
            result.body, status_code=result.status, headers=dict(result.headers)
        )
    if isinstance(result, NdjsonStream):
        return ClosingStreamResponse(_ndjson(result.items), "application/x-ndjson", result.items)
    if isinstance(result, EventStream):
        return ClosingStreamResponse(_named_events(result), "text/event-stream", result.items)
    if hasattr(result, "__aiter__"):
        return ClosingStreamResponse(_sse(result), "text/event-stream", result)
    return FastJSONResponse(result)


class FastJSONResponse(JSONResponse):
    """A handler's JSON answer, rendered by orjson: the same JSON values as the stdlib's, an
    embeddings answer's 12,000 floats in 0.5 ms instead of 7. What orjson refuses (a key that is
    not a string, an integer over 64 bits) is rendered by the stdlib as before. Unlike the
    stdlib, orjson writes a float that is not finite as null instead of failing the response;
    the engines do not produce any (the embeddings engine refuses such a vector)."""

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError:
            return super().render(content)


class ClosingStreamResponse(StreamingResponse):
    """A stream (server-sent events, NDJSON) that always closes its source: however the
    response ends (done, client gone, send failed), the handler's stream is closed, which
    stops the generation."""

    def __init__(
        self, events: AsyncGenerator[bytes, None], media_type: str, source: AsyncIterator[Any]
    ) -> None:
        super().__init__(
            events,
            media_type=media_type,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._events = events
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            # Also when the framing generator never started (the client left before the
            # first byte), whose own `finally` then never ran.
            await close(self._source)


async def _sse(chunks: AsyncIterator[Any]) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in chunks:
            data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
            yield f"data: {data}\n\n".encode()
    except HandlerError as exc:
        yield f"data: {json.dumps(exc.to_dict())}\n\n".encode()
    except Exception:
        structlog.get_logger("tiffin.http").exception("stream failed")
        failure = HandlerError(500, "internal server error while streaming", type="server_error")
        yield f"data: {json.dumps(failure.to_dict())}\n\n".encode()
    finally:
        await close(chunks)
    yield b"data: [DONE]\n\n"


async def _named_events(stream: EventStream) -> AsyncGenerator[bytes, None]:
    def frame(name: str, data: Any) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    try:
        async for name, data in stream.items:
            yield frame(name, data)
    except HandlerError as exc:
        yield frame("error", stream.render_error(exc))
    except Exception:
        structlog.get_logger("tiffin.http").exception("stream failed")
        failure = HandlerError(500, "internal server error while streaming", type="server_error")
        yield frame("error", stream.render_error(failure))
    finally:
        await close(stream.items)


async def _ndjson(items: AsyncIterator[Any]) -> AsyncGenerator[bytes, None]:
    try:
        async for item in items:
            yield json.dumps(item, separators=(",", ":")).encode() + b"\n"
    except HandlerError as exc:
        yield json.dumps({"error": exc.message}).encode() + b"\n"
    except Exception:
        structlog.get_logger("tiffin.http").exception("stream failed")
        yield b'{"error":"internal server error while streaming"}\n'
    finally:
        await close(items)


def _install_error_handlers(app: FastAPI) -> None:
    log = structlog.get_logger("tiffin.http")

    @app.exception_handler(HandlerError)
    async def handler_error(request: Request, exc: HandlerError) -> Response:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route for {request.method} {shown(request.url.path)}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {shown(request.url.path)}"
        return error_response(exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, str(first.get("msg", "invalid request")), param=param)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        request_id = getattr(request.state, "request_id", "")
        log.exception("unhandled error", path=request.url.path)
        return error_response(500, f"internal server error (request id {request_id})")
