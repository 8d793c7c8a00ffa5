"""GraphQL transport: a strawberry schema built from the route table, served at `/graphql` on
the HTTP port (queries and mutations over HTTP, subscriptions over graphql-transport-ws on the
same path) with GraphiQL for browsers. Resolvers (graphql_fields.py) dispatch Events to the
same handlers HTTP uses; nothing here knows what a handler does.

Limits (`graphql.max_depth`, `max_tokens`, `max_aliases`) are checked while validating, before
any resolver runs; a document over them is answered with a GraphQL error.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import strawberry
from cross_web import HTTPException
from fastapi import Request
from graphql import GraphQLError
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from strawberry import UNSET
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.extensions import MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.fastapi import GraphQLRouter
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionContext

from runtime.config_schema import GraphqlKind, RouteConfig
from runtime.dispatch import parse_json
from runtime.transports.graphql_batches import BATCH_FIELDS
from runtime.transports.graphql_fields import TYPED, field
from runtime.types import HandlerError

if TYPE_CHECKING:
    from runtime.app import Runtime

PATH = "/graphql"
_ASSETS = Path(__file__).with_name("graphiql")
_ASSET_FILES = {
    "graphiql.min.js": "text/javascript",
    "graphiql.min.css": "text/css",
    "react.production.min.js": "text/javascript",
    "react-dom.production.min.js": "text/javascript",
}


def build_schema(runtime: Runtime) -> strawberry.Schema:
    """The schema of one Runtime: one field per route-table row with a `graphql` column."""
    settings = runtime.settings
    kinds: dict[GraphqlKind, dict[str, Any]] = {kind: {} for kind in GraphqlKind}
    for route_name, route in settings.handlers.routes.items():
        if route.graphql is not None:
            kinds[route.graphql.kind][route_name] = _field(route_name, route)
    if not kinds[GraphqlKind.query]:
        # GraphQL needs a Query type even when the route table gives it no field.
        kinds[GraphqlKind.query]["ready"] = strawberry.field(
            resolver=_ready, description="Whether the runtime is ready (as /readyz)."
        )
    limits = settings.graphql
    return _Schema(
        query=_object("Query", kinds[GraphqlKind.query]),
        mutation=_object("Mutation", kinds[GraphqlKind.mutation]),
        subscription=_object("Subscription", kinds[GraphqlKind.subscription]),
        extensions=[
            partial(QueryDepthLimiter, max_depth=limits.max_depth),
            partial(MaxTokensLimiter, max_token_count=limits.max_tokens),
            partial(MaxAliasesLimiter, max_alias_count=limits.max_aliases),
        ],
    )


class _Schema(strawberry.Schema):
    """Logs only unexpected errors: a handler's refusal (it carries a status) or a document
    that fails validation (the limits) is the client's business, answered and not logged."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        unexpected = [
            error
            for error in errors
            if error.original_error is not None and "status" not in (error.extensions or {})
        ]
        super().process_errors(unexpected, execution_context)


def _field(route_name: str, route: RouteConfig) -> Any:
    assert route.graphql is not None
    return field(
        route_name,
        route.handler,
        route.graphql.field,
        route.graphql.kind,
        route.description,
        TYPED | BATCH_FIELDS,
    )


def _object(name: str, fields: dict[str, Any]) -> Any:
    if not fields:
        return None
    return strawberry.type(type(name, (), dict(fields)))


def _ready(info: strawberry.Info) -> bool:
    return bool(info.context["runtime"].ready)


class _BadMessage(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _StrictMessages(ASGIWebSocketAdapter):
    """Strawberry's socket, closing with 4400 (the protocol's "invalid message") and the
    reason when a message is refused; strawberry itself would fail on a message that is JSON
    but not an object (`1`, `[]`), and say nothing more precise than "not valid JSON"."""

    async def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object]:
        try:
            async for message in super().iter_json(ignore_parsing_errors=ignore_parsing_errors):
                yield message
        except _BadMessage as exc:
            # A close reason holds 123 bytes.
            await self.close(4400, exc.reason.encode()[:120].decode(errors="ignore"))


class TiffinGraphQLRouter(GraphQLRouter[dict[str, Any], None]):
    """Strawberry's FastAPI router with Tiffin's GraphiQL page, whose scripts Tiffin serves
    itself (runtime/transports/graphiql/) so the IDE works without internet access."""

    websocket_adapter_class = _StrictMessages

    def __init__(self, schema: strawberry.Schema, runtime: Runtime, graphiql: bool) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql" if graphiql else None,
            context_getter=lambda: {"runtime": runtime},
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        )
        self._graphiql = graphiql
        self.add_api_route("/assets/{name}", self._asset, methods=["GET"], include_in_schema=False)

    def parse_json(self, data: str | bytes) -> Any:
        # Strawberry catches only syntax errors; input nested past the decoder's recursion
        # limit, or with a 5000-digit number, or not UTF-8, or with a lone surrogate, is the
        # client's error too. So is JSON that is no object: strawberry would call `.get` on
        # it. (A list is a batch, which strawberry refuses itself.)
        try:
            request = parse_json(data, "the request body")
        except HandlerError as exc:
            raise HTTPException(exc.status, exc.message) from None
        if not isinstance(request, dict | list):
            raise HTTPException(
                400, f'expected a JSON object such as {{"query": "..."}}, got {_kind(request)}'
            )
        return request

    def decode_json(self, data: str | bytes) -> object:
        """A graphql-transport-ws message (HTTP bodies go through `parse_json`): JSON as
        strict as a body's, and in the protocol's shape, or the socket closes with 4400."""
        try:
            message = parse_json(data, "the message")
        except HandlerError as exc:
            raise _BadMessage(exc.message) from None
        problem = _message_problem(message)
        if problem:
            raise _BadMessage(problem)
        return message

    async def run(self, request: Any, context: Any = UNSET, root_value: Any = UNSET) -> Any:
        """As strawberry's, but a request it refuses before execution (not JSON, `query` not
        a string...) is answered `{"errors": [...]}` in JSON, not as plain text."""
        try:
            return await super().run(request, context, root_value)
        except HTTPException as exc:
            if self.is_websocket_request(request):
                raise
            errors = [{"message": exc.reason}]
            return JSONResponse({"errors": errors}, status_code=exc.status_code)

    async def render_graphql_ide(self, request: Request) -> HTMLResponse:
        page = (_ASSETS / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(
            page.replace("{{ASSETS}}", f"{request.scope.get('root_path', '')}{PATH}/assets")
        )

    async def _asset(self, name: str) -> Response:
        media_type = _ASSET_FILES.get(name)
        if media_type is None or not self._graphiql:
            return Response(status_code=404)
        return FileResponse(
            _ASSETS / name, media_type=media_type, headers={"cache-control": "max-age=86400"}
        )


def _message_problem(message: Any) -> str | None:
    """What is wrong with a graphql-transport-ws message, for what strawberry would not
    check before using it (an `id` used as a key, a `payload` read as an object)."""
    if not isinstance(message, dict):
        return f"a message must be a JSON object, got {_kind(message)}"
    if not isinstance(message.get("type"), str):
        return "a message needs a `type` string"
    if message["type"] not in ("subscribe", "complete"):
        return None
    if not isinstance(message.get("id"), str):
        return f"a {message['type']} message needs an `id` string"
    if message["type"] == "complete":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return "a subscribe message needs a `payload` object with a `query` string"
    for key in ("variables", "extensions"):
        if not isinstance(payload.get(key), dict | None):
            return f"`payload.{key}` must be an object or null"
    if not isinstance(payload.get("operationName"), str | None):
        return "`payload.operationName` must be a string or null"
    return None


def _kind(value: Any) -> str:
    """The JSON type of a decoded value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def create_router(runtime: Runtime) -> TiffinGraphQLRouter:
    """The `/graphql` router of one Runtime (include it with prefix `PATH`)."""
    return TiffinGraphQLRouter(build_schema(runtime), runtime, runtime.settings.graphql.graphiql)
