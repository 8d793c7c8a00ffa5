"""What every transport shares: the Event a request becomes, the Context a handler gets, the
reply and error types, and the Dispatcher that runs `before_request` and calls the handler.

Transports decode their wire format into an `Event`, call `Dispatcher.dispatch(route, event)`,
and encode whatever comes back: a dict (JSON), a `Reply` (status + body), or an async
iterator (a stream). Handlers raise `HandlerError` for expected failures; transports map its
`status` to their own codes (HTTP status, gRPC code, GraphQL error).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy
import structlog

from hooks import resolve, resolve_all
from runtime import client_json, generation
from runtime.generation import Outcome
from runtime.integrations.manager import IntegrationManager, current_manager
from runtime.telemetry.tracing import Tracing
from runtime.types import (
    Chunk,
    Closed,
    Embeddings,
    Event,
    EventStream,
    GenerationRequest,
    HandlerError,
    NdjsonStream,
    Reply,
    Stream,
)

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.events import EventBus
    from runtime.models import ModelRouter, ServedModel

Handler = Callable[["Event", "Context"], Awaitable[Any]]
_H = TypeVar("_H", bound=Callable[..., Any])


def parse_json(raw: str | bytes, what: str) -> Any:
    """Decode JSON from a client, or raise a 400 (`invalid_json`) saying why and, when the
    problem is at one place (a lone surrogate, a number that is not finite), naming it as
    `param`: runtime/client_json.py holds what is refused."""
    try:
        return client_json.decode(raw)
    except client_json.InvalidJson as exc:
        where = f"{exc.path}: " if exc.path else ""
        raise HandlerError(
            400,
            f"{what} is not valid JSON: {where}{exc.reason}",
            code="invalid_json",
            param=exc.path,
        ) from None


def request_body(model: Any) -> Callable[[_H], _H]:
    """Declare the body a handler accepts (a pydantic model class, or a JSON Schema dict) so
    transports can describe it (the OpenAPI spec). Description only: the handler's own
    validation stays the source of truth for what is accepted and for the error messages."""

    def mark(handler: _H) -> _H:
        handler.__dict__["request_body"] = model
        return handler

    return mark


def error_body(render: Callable[[HandlerError], Any]) -> Callable[[_H], _H]:
    """Declare the body a handler's errors take on the wire when that is not OpenAI's shape
    (Ollama's `{"error": "..."}`), so that a transport refusing a request before the handler
    runs (a body that is not JSON, a missing key) answers in the handler's shape too."""

    def mark(handler: _H) -> _H:
        handler.__dict__["error_body"] = render
        return handler

    return mark


def errors_as(render: Callable[[HandlerError], Any]) -> Callable[[Handler], Handler]:
    """A handler whose errors take `render`'s shape on the wire (Ollama's, Anthropic's): its
    HandlerErrors become a Reply with that body and the same status, and `error_body` makes
    the transports answer their own refusals of its requests the same way."""

    def wrap(handler: Handler) -> Handler:
        @error_body(render)
        @functools.wraps(handler)
        async def wrapped(event: Event, ctx: Context) -> Any:
            try:
                return await handler(event, ctx)
            except HandlerError as exc:
                return Reply(render(exc), status=exc.status, headers=exc.headers, error=exc)

        return wrapped

    return wrap


@dataclass
class Context:
    """What a handler may use. Handlers never reach transports or engines directly."""

    runtime: Runtime
    integrations: IntegrationManager
    models: ModelRouter
    events: EventBus
    hooks: pluggy.HookRelay
    log: Any
    tracer: Tracing = field(default_factory=Tracing.disabled)
    deadline: float | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The model the request used (set when a handler resolves one), for metrics and traces.
    model: str = ""
    provider: str = ""
    # Who made the request (runtime/auth's Principal), once `before_request` has checked it.
    principal: Any = None
    # A Batch API line: its generations run behind live ones (GenerationRequest.background).
    background: bool = False
    # Called when the request is over, however it ended: streams the handler opened are
    # closed here even if no transport ever read them.
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    # Shutdown, shared by every request of one Dispatcher. `draining` is set when it begins:
    # endless feeds (live stats, event streams) end then. `abort` is set when the drain timeout
    # has passed: generation streams end at their next chunk with finish_reason "abort".
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    # Called when `abort` is set, to interrupt waits that would not notice it (a model stuck
    # on its next chunk, a request queued for its model).
    on_abort: list[Callable[[], None]] = field(default_factory=list)

    @property
    def remaining(self) -> float | None:
        """Seconds left before the request's deadline, or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    # The one generation path (runtime/generation.py), as handlers reach it.

    def model_for(self, model_id: str, capability: str) -> ServedModel:
        """The model `model_id` names (an id or alias), if it can do `capability`; else a
        404 or a 400. Records it on the context for metrics and traces."""
        return generation.find_model(self, model_id, capability)

    async def generate(
        self, request: GenerationRequest, on_done: Callable[[Outcome], None] | None = None
    ) -> tuple[Stream[Chunk], Outcome]:
        """Start `request`: hooks, the router, the first chunk (errors before anything is
        sent). Returns the chunks and the Outcome they fill; closing the stream (or the
        request ending) stops the generation."""
        return await generation.start_generation(self, request, on_done)

    async def embed(self, model: ServedModel, texts: list[str]) -> Embeddings:
        """Embed `texts` on `model` (from `model_for`)."""
        return await generation.embed_texts(self, model, texts)


class Dispatcher:
    """Runs a route's handler for an Event: context, deadline, `before_request`, the call."""

    def __init__(
        self,
        runtime: Runtime,
        handlers: Mapping[str, Handler],
        routes: Mapping[str, str],
        *,
        request_timeout_s: float | None = None,
    ) -> None:
        self.runtime = runtime
        self.handlers = dict(handlers)
        self.routes = dict(routes)  # route name -> handler name
        self.request_timeout_s = request_timeout_s
        # Shutdown: while draining, new requests get 503; `abort` ends the streams still open.
        self.drain_started = asyncio.Event()
        self.abort = asyncio.Event()
        self.in_flight: set[_Finish] = set()
        self.idle = asyncio.Event()  # set whenever nothing is in flight

    def context(self, event: Event) -> Context:
        runtime = self.runtime
        deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else None
        return Context(
            runtime=runtime,
            integrations=runtime.integrations,
            models=runtime.models,
            events=runtime.events,
            hooks=runtime.plugins.hook,
            log=structlog.get_logger("tiffin.handler").bind(
                request_id=event.request_id, route=event.route, transport=event.transport
            ),
            tracer=runtime.tracing,
            deadline=deadline,
            draining=self.drain_started,
            abort=self.abort,
        )

    async def dispatch(self, route: str, event: Event, ctx: Context | None = None) -> Any:
        """Call the route's handler. `request_started` and `request_finished` bracket the
        request: for a streamed result, it finishes when the stream ends or is closed."""
        handler = self.handlers[self.routes[route]]
        event.route = route
        ctx = ctx or self.context(event)
        current_manager.set(ctx.integrations)
        finish = _Finish(event, ctx, self._finished)
        self.in_flight.add(finish)
        self.idle.clear()
        await resolve_all(ctx.hooks.request_started(event=event, ctx=ctx))
        try:
            if self.draining:
                raise HandlerError(
                    503,
                    "the server is shutting down; retry on another instance",
                    type="server_error",
                    code="shutting_down",
                    headers={"retry-after": "1"},
                )
            for check in ctx.hooks.authenticate(event=event, ctx=ctx):
                await resolve(check)  # each awaited in turn; a refusal raises HandlerError
            result = await resolve(ctx.hooks.before_request(event=event, ctx=ctx))
            if result is None:
                result = await self._traced(handler, event, ctx)
        except HandlerError as exc:
            await finish(exc.status, exc)
            raise
        except asyncio.CancelledError:
            await finish(499, None)
            raise
        except Exception:
            await finish(500, None)
            raise
        if isinstance(result, NdjsonStream):
            return NdjsonStream(Stream(result.items, finish.stream_ended))
        if isinstance(result, EventStream):
            return EventStream(Stream(result.items, finish.stream_ended), result.render_error)
        if hasattr(result, "__aiter__") and not isinstance(result, Mapping):
            return Stream(result, finish.stream_ended)
        if isinstance(result, Reply):
            await finish(result.status, result.error)
        else:
            await finish(200, None)
        return result

    async def refuse(self, route: str, event: Event, error: HandlerError) -> None:
        """Record a request that its transport refused before it could be dispatched (a body
        that is not JSON, a gRPC message that does not decode): `request_started` and
        `request_finished` see it as they see any other, so metrics count its error."""
        event.route = route
        ctx = self.context(event)
        await resolve_all(ctx.hooks.request_started(event=event, ctx=ctx))
        await _Finish(event, ctx, lambda _: None)(error.status, error)

    @property
    def draining(self) -> bool:
        """Whether a shutdown has begun (new requests get 503)."""
        return self.drain_started.is_set()

    async def drain(self, timeout_s: float, *, abort_grace_s: float = 5.0) -> int:
        """Refuse new requests (503), end endless feeds (`Context.draining`), wait up to
        `timeout_s` for the requests in flight to finish,
        then set `abort` so the generation streams still open end at their next chunk with
        finish_reason "abort", and wait up to `abort_grace_s` more for them to end.
        Returns how many requests were still in flight at the timeout."""
        self.drain_started.set()
        await self._settle(timeout_s)
        left = len(self.in_flight)
        if left:
            self.abort.set()
            for finish in list(self.in_flight):
                for interrupt in finish.ctx.on_abort:
                    interrupt()
            await self._settle(abort_grace_s)
        return left

    async def _settle(self, timeout_s: float) -> None:
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout_s)

    def _finished(self, finish: _Finish) -> None:
        self.in_flight.discard(finish)
        if not self.in_flight:
            self.idle.set()

    async def _traced(self, handler: Handler, event: Event, ctx: Context) -> Any:
        """The handler call, in a `handler <route>` span when tracing is on. A streamed result
        keeps the span open until the stream ends or is closed."""
        if not ctx.tracer.enabled:
            return await handler(event, ctx)
        tracer = ctx.tracer
        span = tracer.start_span(f"handler {event.route}")
        if span.is_recording():
            span.set_attributes(
                {
                    "tiffin.route": event.route,
                    "tiffin.handler": self.routes[event.route],
                    "tiffin.transport": event.transport,
                    "tiffin.request_id": event.request_id,
                }
            )
        try:
            with tracer.current(span):
                result = await handler(event, ctx)
        except BaseException as exc:
            tracer.end(span, exc)
            raise
        if isinstance(result, NdjsonStream):
            return NdjsonStream(tracer.stream(result.items, span))
        if isinstance(result, EventStream):
            return EventStream(tracer.stream(result.items, span), result.render_error)
        if hasattr(result, "__aiter__"):
            return tracer.stream(result, span)
        tracer.end(span)
        return result


class _Finish:
    """Calls `request_finished` once for an event, however the request ends."""

    def __init__(self, event: Event, ctx: Context, on_done: Callable[[_Finish], None]) -> None:
        self.event = event
        self.ctx = ctx
        self.on_done = on_done
        self.started = time.perf_counter()
        self.done = False

    async def __call__(self, status: int, error: HandlerError | None) -> None:
        if self.done:
            return
        self.done = True
        seconds = time.perf_counter() - self.started
        try:
            for close in reversed(self.ctx.closers):
                await close()
            await resolve_all(
                self.ctx.hooks.request_finished(
                    event=self.event, ctx=self.ctx, status=status, seconds=seconds, error=error
                )
            )
        finally:
            self.on_done(self)

    async def stream_ended(self, error: BaseException | None) -> None:
        """How a streamed result ended, as the request's status: 200 when it ran out, the
        error's status when it raised one, 499 when it was closed early or cancelled (the
        client went away), 500 for anything else."""
        if error is None:
            await self(200, None)
        elif isinstance(error, HandlerError):
            await self(error.status, error)
        elif isinstance(error, Closed | asyncio.CancelledError | GeneratorExit):
            await self(499, None)
        else:
            await self(500, None)
