"""Every extension point of Tiffin, as pluggy hookspecs.

Implement any of these in a plugin module or object with `@hookimpl` and list it under
`plugins:` in the config, or publish it in the `tiffin` entry-point group. Tiffin's own
behaviour is registered the same way (with `trylast=True`), so a plugin can override it.

Request hooks may return a value or an awaitable; Tiffin awaits whichever it gets
(`hooks.resolve`). Hooks marked "first result wins" stop at the first non-None result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from runtime.app import Runtime
    from runtime.dispatch import Context
    from runtime.events import BusEvent
    from runtime.integrations.base import Health
    from runtime.types import Event, GenerationRequest, HandlerError

PROJECT = "tiffin"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_integrations(register: Callable[..., None]) -> None:
    """Called once while a Runtime is built, before integrations are created.

    Call `register(cls, alias=None)` for each BaseIntegration subclass the plugin provides; only
    registered classes (and this project's own) may be named by an integration's `_target_`.
    Returns nothing.
    """


@hookspec
def register_engines(register: Callable[..., None]) -> None:
    """Called once while a Runtime is built, to collect local inference engines.

    Call `register(name, factory)`: `name` is what a model's `engine:` setting says
    (`llama_cpp`, `exllamav2`...), `factory(model_config)` returns an Engine. Returns nothing.
    """


@hookspec
def register_handlers(register: Callable[..., None]) -> None:
    """Called once while a Runtime is built, to collect handler functions.

    Call `register(name, fn)` where `fn` is `async def fn(event, ctx)`; the route table in
    `conf/handlers/` refers to handlers by these names. The first registration of a name wins;
    user plugins run before Tiffin's `trylast` built-ins, so they can replace any handler.
    Returns nothing.
    """


@hookspec
def runtime_started(runtime: Runtime) -> Awaitable[None] | None:
    """Called after the Runtime has started its integrations and is about to take traffic.

    `runtime` is the Runtime. May return an awaitable, which is awaited. Return value ignored.
    """


@hookspec
def runtime_stopping(runtime: Runtime) -> Awaitable[None] | None:
    """Called when the Runtime begins to stop, before integrations are shut down.

    `runtime` is the Runtime. May return an awaitable, which is awaited. Return value ignored.
    """


@hookspec
def authenticate(event: Event, ctx: Context) -> Awaitable[None] | None:
    """Called for every request on every transport, after `request_started` and before
    `before_request`, to establish who is calling. Raise a HandlerError (401, 403, 429) to
    refuse the request; set `event.principal` / `ctx.principal` to accept it. Return None
    (or an awaitable resolving to None); each implementation is awaited in turn before any
    `before_request` runs, so no plugin can answer a request whose caller was refused. The
    built-in implementation is API-key auth (runtime/auth/plugin.py).
    """


@hookspec(firstresult=True)
def before_request(event: Event, ctx: Context) -> Any:
    """Called for every request on every transport, after it is decoded, before the handler.

    `event` is the decoded Event (body, headers, params, transport), `ctx` the Context.
    Return None to continue, or a result (a dict, a `Reply`, or raise a HandlerError) to answer
    the request without calling the handler. First result wins. May return an awaitable.
    Runs after `authenticate`, so `event.principal` is already set when auth is on.
    """


@hookspec
def request_started(event: Event, ctx: Context) -> Awaitable[None] | None:
    """Called for every request on every transport when it arrives, before `before_request`.

    Observational (metrics count requests in flight here): return values are ignored, and
    `request_finished` is always called later for the same event.
    """


@hookspec
def request_finished(
    event: Event, ctx: Context, status: int, seconds: float, error: HandlerError | None
) -> Awaitable[None] | None:
    """Called once when a request is over: its answer was sent, or its stream ended, or the
    client went away. `status` is HTTP's vocabulary whatever the transport (200, 4xx, 5xx;
    499 when the client left first), `seconds` the time since arrival, `error` the
    HandlerError it ended with (or None). `ctx.model` / `ctx.provider` name the model the
    request used, when it used one. Observational: return values are ignored.
    """


@hookspec(firstresult=True)
def before_generate(
    request: GenerationRequest, ctx: Context
) -> GenerationRequest | Awaitable[GenerationRequest | None] | None:
    """Called before a generation request goes to a model provider.

    `request` is the validated generation request, `ctx` the Context. Return None to leave it
    as is, or a replacement request. First result wins. May return an awaitable.
    """


@hookspec
def after_generate(
    request: GenerationRequest, response: dict[str, Any], ctx: Context
) -> Awaitable[None] | None:
    """Called after a generation finished (or failed), with its request and final response, a
    dict: `usage` (prompt/completion tokens), `finish_reasons` (by choice), `cost`, `error`
    (text or None), `seconds` (whole generation), `ttft_s` (to the first chunk, or None),
    `model` and `provider` (the model that answered: the requested one or a fallback).
    Observational: return values are ignored. May return an awaitable.
    """


@hookspec
def after_health_check(name: str, health: Health) -> Awaitable[None] | None:
    """Called after every health check of an integration (at start, periodically, on
    recovery). `name` is the integration, `health` its `Health` (healthy, detail,
    latency_s). Observational: return values are ignored; keep it cheap.
    """


@hookspec
def on_event(event: BusEvent) -> Awaitable[None] | None:
    """Called for every event published on the runtime's event bus (`integration.started`,
    `integration.health_changed`, ...). `event` is a BusEvent. May return an awaitable.
    Events another worker or replica published reach here too when the redis integration
    bridges them: those have `event.origin` set (`event.remote` is true).
    Return value ignored; exceptions are logged and do not reach the publisher.
    """


@hookspec(firstresult=True)
def estimate_cost(
    model: str, prompt_tokens: int, completion_tokens: int, prices: Mapping[str, float] | None
) -> float | Awaitable[float | None] | None:
    """Called after a generation to price it. `prices` is the model's configured price table
    (per 1k prompt and completion tokens) or None. Return the cost as a float in the
    configured currency. First result wins; the built-in plugin prices from config.
    """
