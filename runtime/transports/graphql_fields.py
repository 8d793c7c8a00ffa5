"""GraphQL fields for the handlers of the route table. A row with a `graphql` column becomes one
field of Query, Mutation or Subscription, named as the row says; its resolver decodes the
arguments into an Event shaped like the JSON body (or path and query params) the handler
takes over HTTP, dispatches it, and maps the handler's dict to a wire type.

Handlers with a typed mapping are listed in `TYPED`; any other handler still gets a field
(`input` and `params` JSON arguments in, its answer out as JSON), so a row added to the route
table is served at once, and a row removed takes its field with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import strawberry
import structlog
from graphql import GraphQLError
from starlette.requests import Request
from strawberry.scalars import JSON
from strawberry.types import Info

from runtime.config_schema import GraphqlKind
from runtime.dispatch import Context
from runtime.transports import graphql_subscriptions as live
from runtime.transports import graphql_types as wire
from runtime.types import Event, HandlerError, Reply, close

FieldFactory = Callable[[str], Any]  # route name -> resolver function


def graphql_error(exc: HandlerError) -> GraphQLError:
    """A HandlerError in GraphQL's shape: the message, and `extensions` saying what HTTP
    would have said (status, OpenAI error type, code, param)."""
    extensions = {"code": exc.code or exc.type, "status": exc.status, "type": exc.type}
    if exc.param:
        extensions["param"] = exc.param
    if "retry-after" in exc.headers:
        extensions["retryAfter"] = int(exc.headers["retry-after"])
    return GraphQLError(exc.message, extensions=extensions)


def _event(
    info: Info, route: str, body: Any, path: Mapping[str, str], query: Mapping[str, str]
) -> Event:
    request = info.context["request"]
    request_id = request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex
    return Event(
        body=body,
        headers=request.headers,
        path_params=dict(path),
        query=dict(query),
        transport="graphql",
        route=route,
        request_id=request_id,
    )


async def dispatch(
    info: Info,
    route: str,
    body: Any = None,
    path: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> Any:
    """Run the route's handler as HTTP does: same Dispatcher, same `before_request` (auth)."""
    dispatcher = info.context["runtime"].dispatcher
    event = _event(info, route, body, path or {}, query or {})
    ctx = dispatcher.context(event)
    try:
        work = dispatcher.dispatch(route, event, ctx)
        result = await _unless_gone(info.context["request"], ctx, work)
    except HandlerError as exc:
        raise graphql_error(exc) from None
    except asyncio.CancelledError:
        ctx.cancelled.set()  # the client went away: the handler stops its work
        raise
    except Exception:
        structlog.get_logger("tiffin.graphql").exception("resolver failed", route=route)
        raise GraphQLError(
            f"internal server error (request id {event.request_id})",
            extensions={"code": "internal_error", "status": 500, "type": "server_error"},
        ) from None
    if isinstance(result, Reply):
        if result.status >= 400:
            raise GraphQLError(
                f"{route} answered {result.status}",
                extensions={"code": "error", "status": result.status, "type": "server_error"},
            )
        cost = result.headers.get("x-tiffin-cost")  # handlers/openai_api.py's cost_header
        if cost is not None and isinstance(result.body, dict):
            return {**result.body, "cost": float(cost)}
        return result.body
    return result


async def _unless_gone(request: Any, ctx: Context, work: Awaitable[Any]) -> Any:
    """`work`'s result, unless the HTTP client goes away first: then the work is stopped (a
    generation nobody will read frees its engine) and the answer, for nobody, is a 499 error.
    (Over a WebSocket, strawberry cancels the operation itself when the socket closes.)"""
    task = asyncio.ensure_future(work)
    if not isinstance(request, Request):
        return await task
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        ctx.cancelled.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise HandlerError(499, "the client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def stream(
    info: Info, route: str, query: Mapping[str, str] | None = None
) -> AsyncGenerator[Any, None]:
    """A streaming handler's items; closing the subscription closes the handler's stream."""
    items: AsyncIterator[Any] = await dispatch(info, route, query=query)
    try:
        async for item in items:
            yield item
    except HandlerError as exc:
        raise graphql_error(exc) from None
    finally:
        await close(items)


# --- typed fields, by handler ---------------------------------------------------------------------


def _models(route: str) -> Any:
    async def models(info: Info) -> list[wire.Model]:
        """Every servable model."""
        return wire.models(await dispatch(info, route))

    return models


def _integrations(route: str) -> Any:
    async def integrations(info: Info) -> list[wire.Integration]:
        """Every configured integration with its status."""
        return wire.integrations(await dispatch(info, route))

    return integrations


def _generate_text(route: str) -> Any:
    async def generate_text(
        info: Info,
        model: str,
        prompt: str,
        system: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        tools: list[wire.ToolInput] | None = None,
        tool_choice: str | None = None,
    ) -> wire.Generation:
        """Generate text: a chat completion with one user message (and an optional system one).
        With `tools`, the model may call them (`toolChoice`: none, auto, required, or a
        function's name) and `toolCalls` lists the calls."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False}
        if tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description or "",
                        "parameters": tool.parameters or {"type": "object", "properties": {}},
                    },
                }
                for tool in tools
            ]
        if tool_choice is not None:
            named = {"type": "function", "function": {"name": tool_choice}}
            body["tool_choice"] = (
                tool_choice if tool_choice in ("none", "auto", "required") else named
            )
        options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        options |= {"top_p": top_p, "seed": seed, "stop": stop}
        body.update({key: value for key, value in options.items() if value is not None})
        return wire.generation(await dispatch(info, route, body=body))

    return generate_text


def _model_action(route: str) -> Any:
    async def model_action(info: Info, model: str) -> wire.ModelStatus:
        """Act on one model (load or unload); returns its status after."""
        return wire.model_status(await dispatch(info, route, path={"model": model}))

    return model_action


def _model_status_updates(route: str) -> Any:
    async def model_status_updates(
        info: Info, model: str | None = None
    ) -> AsyncGenerator[wire.ModelStatusUpdate, None]:
        """Model status changes as they happen (loading, loaded, unloaded, failed); `model`
        keeps one model's."""
        async for event in stream(info, route, query={"types": "model.*"}):
            update = wire.model_status_update(event)
            if update is not None and (model is None or update.id == model):
                yield update

    return model_status_updates


def _metrics(route: str) -> Any:
    async def metrics(info: Info, window: float | None = None) -> live.MetricsSnapshot:
        """This worker's live metrics over the last `window` seconds (default 60)."""
        query = {} if window is None else {"window": str(window)}
        return live.metrics_snapshot(await dispatch(info, route, query=query))

    return metrics


def _metrics_stream(route: str) -> Any:
    async def metrics(
        info: Info, interval: float | None = None, window: float | None = None
    ) -> AsyncGenerator[live.MetricsSnapshot, None]:
        """A live metrics snapshot now and every `interval` seconds (default 1)."""
        values = {"interval": interval, "window": window}
        query = {key: str(value) for key, value in values.items() if value is not None}
        async for snapshot in stream(info, route, query=query):
            yield live.metrics_snapshot(snapshot)

    return metrics


def _generation_requests(route: str) -> Any:
    async def generation_requests(
        info: Info, limit: int | None = None
    ) -> list[live.GenerationRequest]:
        """The latest generation requests of this worker, newest first (default 20)."""
        query = {} if limit is None else {"limit": str(limit)}
        return [live.generation_request(r) for r in await dispatch(info, route, query=query)]

    return generation_requests


TYPED: dict[str, FieldFactory] = {
    "openai.list_models": _models,
    "integrations.status": _integrations,
    "openai.chat_completions": _generate_text,
    "admin.load_model": _model_action,
    "admin.unload_model": _model_action,
    "events.watch": _model_status_updates,
    "metrics.snapshot": _metrics,
    "metrics.watch": _metrics_stream,
    "requests.recent": _generation_requests,
}


# --- any other handler: JSON in, JSON out ---------------------------------------------------------


def _untyped(route: str, kind: GraphqlKind) -> Any:
    if kind is GraphqlKind.subscription:

        async def watch(info: Info, params: JSON | None = None) -> AsyncGenerator[JSON, None]:
            """The handler's stream, one JSON item per message; `params` are its query params."""
            async for item in stream(info, route, query=_params(params)):
                yield item

        return watch

    async def call(info: Info, input: JSON | None = None, params: JSON | None = None) -> JSON:
        """The handler's answer as JSON; `input` is its JSON body, `params` its path and
        query params."""
        values = _params(params)
        answer: JSON = await dispatch(info, route, body=input, path=values, query=values)
        return answer

    return call


def _params(params: Any) -> dict[str, str]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise GraphQLError(
            "params: expected an object of strings",
            extensions={"code": "invalid_value", "status": 400, "type": "invalid_request_error"},
        )
    return {str(key): str(value) for key, value in params.items()}


def field(
    route: str,
    handler: str,
    name: str,
    kind: GraphqlKind,
    description: str,
    typed: Mapping[str, FieldFactory] = TYPED,
) -> Any:
    """The strawberry field of one route-table row (typed by `typed[handler]` when there)."""
    factory = typed.get(handler)
    resolver = factory(route) if factory is not None else _untyped(route, kind)
    if factory is not None:  # the route's text speaks of HTTP; the resolver's of this field
        description = inspect.cleandoc(resolver.__doc__ or description)
    if kind is GraphqlKind.subscription:
        return strawberry.subscription(
            resolver=resolver, name=name, description=description or None
        )
    if kind is GraphqlKind.mutation:
        return strawberry.mutation(resolver=resolver, name=name, description=description or None)
    return strawberry.field(resolver=resolver, name=name, description=description or None)
