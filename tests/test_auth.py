"""API keys, scopes and per-key rate limits (runtime/auth/) on every transport: HTTP in-process,
gRPC on a loopback port, WebSocket and GraphQL (subscriptions too) through uvicorn; keys never
in logs, status or the printed config; `auth.required` with no keys refuses all but public
routes; the `keys` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import structlog
from websockets.exceptions import ConnectionClosed

from hooks import hookimpl
from runtime.app import Runtime
from runtime.auth import KeyRing, RateLimiter, hash_key, presented_key
from runtime.cli.main import main
from runtime.config_schema import (
    ApiKeyConfig,
    LogFormat,
    LoggingConfig,
    ModelConfig,
    RateLimitConfig,
)
from runtime.engines.engine import ModelSpec
from runtime.errors import ConfigError
from runtime.events import BusEvent
from runtime.telemetry.logging import configure_logging
from runtime.transports.http import create_app
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc
from runtime.types import Event, HandlerError
from tests.test_graphql import GENERATE, data, only_error
from tests.test_graphql import start as start_graphql
from tests.test_grpc import serve as serve_grpc
from tests.test_openai_api import ScriptedEngines, chat
from tests.test_ws import assert_error, recv, send, turn
from tests.test_ws import serve as serve_ws

MakeRuntime = Callable[..., Runtime]

ADMIN_KEY = "tk-admin-planted-3f9a1c"
APP_KEY = "tk-app-planted-77e2b0"
KEYS = (
    f"auth.keys=[{{name:ops,key:{ADMIN_KEY},scopes:[admin]}},"
    f"{{name:app,key:{APP_KEY},scopes:[inference]}}]"
)
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
APP = {"x-api-key": APP_KEY}


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def http_client(runtime: Runtime) -> httpx.AsyncClient:
    await runtime.start()
    runtime.models.register(
        ModelSpec(ModelConfig(id="m1", source="x", timeout_s=5), Path("x"), "scripted")
    )
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")


# --- keys ---------------------------------------------------------------------------------------


def test_keys_are_read_from_either_header_and_held_as_digests() -> None:
    assert presented_key({"Authorization": "Bearer tk-1"}) == "tk-1"
    assert presented_key({"authorization": "bearer  tk-1 "}) == "tk-1"
    assert presented_key({"x-api-key": "tk-2"}) == "tk-2"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({}) is None
    ring = KeyRing.from_config(
        [
            ApiKeyConfig(name="a", key="tk-a", scopes=["admin"]),
            ApiKeyConfig(name="b", key_sha256=hash_key("tk-b")),
            ApiKeyConfig(name="unset", key=""),
        ],
        RateLimitConfig(),
    )
    assert ring.names() == ["a", "b"]
    principal = ring.lookup("tk-a")
    assert principal is not None and principal.scopes == {"admin"}
    assert principal.allows("inference") and principal.allows("public")
    assert ring.lookup("tk-b") is not None and ring.lookup("tk-c") is None
    with pytest.raises(ConfigError, match="scopes"):
        KeyRing.from_config([ApiKeyConfig(name="x", key="k", scopes=["root"])], RateLimitConfig())


def test_a_route_with_an_unknown_scope_is_a_config_error(make_runtime: MakeRuntime) -> None:
    with pytest.raises(ConfigError, match=r"handlers\.routes\.models_list\.scope"):
        make_runtime("handlers.routes.models_list.scope=everyone")


# --- HTTP ---------------------------------------------------------------------------------------


async def test_http_401_403_and_accepted_keys(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(KEYS, builtins=[ScriptedEngines()])
    async with await http_client(runtime) as http:
        missing = await http.get("/v1/models")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.json()["error"]["code"] == "missing_api_key"
        wrong = await http.get("/v1/models", headers={"x-api-key": "tk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/v1/models", headers=APP)).status_code == 200
        assert (await http.get("/v1/models", headers=ADMIN)).status_code == 200
        forbidden = await http.get("/admin/requests", headers=APP)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["type"] == "permission_error"
        assert (await http.get("/admin/requests", headers=ADMIN)).status_code == 200
        assert (await http.post("/admin/models/m1/unload", headers=APP)).status_code == 403
        # Public: load balancers probe health without a key.
        assert (await http.get("/integrations/health")).status_code == 200


async def test_required_with_no_keys_refuses_all_but_public_routes(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime("auth.required=true", builtins=[ScriptedEngines()])
    assert runtime.auth.enforced and len(runtime.auth.keys) == 0
    async with await http_client(runtime) as http:
        assert (await http.get("/integrations/health")).status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/integrations/status"),
            ("GET", "/admin/requests"),
            ("GET", "/metrics/live"),
        ]:
            response = await http.request(method, path, json=chat(model="m1"), headers=APP)
            assert response.status_code == 401, (path, response.text)


async def test_required_with_no_keys_is_said_at_start_and_on_the_status_routes(
    make_runtime: MakeRuntime, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIFFIN_ADMIN_KEY", raising=False)
    monkeypatch.delenv("TIFFIN_API_KEY", raising=False)
    runtime = make_runtime("env=prod", "telemetry.tracing=false", builtins=[ScriptedEngines()])
    async with await http_client(runtime) as http:
        [logged] = [
            json.loads(line)
            for line in log_stream.getvalue().splitlines()
            if "auth_without_keys" in line
        ]
        assert logged["level"] == "warning"
        message = logged["event"]
        assert "no API key is configured" in message
        assert "auth.keys declares admin, client with no value" in message
        assert "python -m runtime keys create --name NAME --scope admin" in message
        # Public, so the operator whose every other request gets 401 can read why.
        health = await http.get("/integrations/health")
        assert health.status_code == 200
        assert health.json()["warnings"] == [{"code": "auth_without_keys", "message": message}]
    # /integrations/status needs a key that cannot exist here: its handler says the same.
    event = Event()
    status = await runtime.handlers["integrations.status"](event, runtime.dispatcher.context(event))
    assert status["warnings"] == [{"code": "auth_without_keys", "message": message}]


def test_no_keyless_warning_where_a_key_can_authenticate(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    assert make_runtime("auth.required=true", KEYS).warnings() == []
    assert make_runtime().warnings() == []  # auth off
    oidc = "auth.oidc.jwks_url=http://127.0.0.1:9/jwks.json"
    assert make_runtime("auth.required=true", oidc).warnings() == []
    database = ["integrations=database", f"integrations.database.settings.data_dir={tmp_path}"]
    # Any key stored in the database turns auth on; it may hold some.
    assert make_runtime("auth.required=true", *database).warnings() == []


async def test_auth_is_off_in_dev_and_test_without_keys(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(builtins=[ScriptedEngines()])
    assert not runtime.auth.enforced
    async with await http_client(runtime) as http:
        assert (await http.get("/admin/requests")).status_code == 200


# --- rate limits --------------------------------------------------------------------------------


async def test_requests_per_minute_429_with_retry_after_then_recovery(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(KEYS, "auth.limits.requests_per_minute=2", builtins=[ScriptedEngines()])
    clock = FakeClock(1_000_040.0)  # 20 s into a minute (windows start at 1_000_020)
    runtime.auth.limiter.clock = clock
    async with await http_client(runtime) as http:
        assert (await http.get("/v1/models", headers=APP)).status_code == 200
        assert (await http.get("/v1/models", headers=APP)).status_code == 200
        limited = await http.get("/v1/models", headers=APP)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "40"
        assert limited.json()["error"]["type"] == "rate_limit_error"
        assert limited.json()["error"]["code"] == "requests_per_minute"
        # Each key has its own count.
        assert (await http.get("/v1/models", headers=ADMIN)).status_code == 200
        clock.now += 40
        assert (await http.get("/v1/models", headers=APP)).status_code == 200


async def test_tokens_per_minute_counted_from_usage(make_runtime: MakeRuntime) -> None:
    keys = (
        f"auth.keys=[{{name:app,key:{APP_KEY},scopes:[inference],limits:{{tokens_per_minute:5}}}}]"
    )
    engines = ScriptedEngines()
    runtime = make_runtime(keys, builtins=[engines])
    clock = FakeClock(1_000_070.0)
    runtime.auth.limiter.clock = clock
    async with await http_client(runtime) as http:
        await runtime.models.load("m1")
        engines.built["m1"].enqueue(["Hel", "lo"])
        first = await http.post("/v1/chat/completions", json=chat(model="m1"), headers=APP)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] >= 5
        limited = await http.post("/v1/chat/completions", json=chat(model="m1"), headers=APP)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "tokens_per_minute"
        assert limited.headers["retry-after"] == "10"
        clock.now += 10
        engines.built["m1"].enqueue(["ok"])
        again = await http.post("/v1/chat/completions", json=chat(model="m1"), headers=APP)
        assert again.status_code == 200


async def test_the_limiter_counts_in_fixed_windows() -> None:
    clock = FakeClock(60.0)
    limiter = RateLimiter(clock=clock)
    limits = RateLimitConfig(requests_per_minute=1)
    await limiter.admit("k", limits)
    with pytest.raises(HandlerError) as refused:
        await limiter.admit("k", limits)
    assert refused.value.status == 429 and refused.value.headers == {"retry-after": "60"}
    clock.now = 119.5
    with pytest.raises(HandlerError) as almost:
        await limiter.admit("k", limits)
    assert almost.value.headers == {"retry-after": "1"}
    clock.now = 120.0
    await limiter.admit("k", limits)
    await limiter.admit("other", limits)
    await limiter.admit("k", RateLimitConfig())  # no limits: never refused


# --- gRPC ---------------------------------------------------------------------------------------


async def test_grpc_metadata_keys_and_scopes(make_runtime: MakeRuntime) -> None:
    # ListModels needs admin here, so an inference key meets a 403 on a unary call.
    runtime = make_runtime(
        KEYS,
        "transports.grpc=true",
        "handlers.routes.models_list.scope=admin",
        "auth.limits.requests_per_minute=3",
        builtins=[ScriptedEngines()],
    )
    await runtime.start()
    server, channel = await serve_grpc(runtime)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.ListModelsRequest()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ListModels(request)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as forbidden:
            await stub.ListModels(request, metadata=(("x-api-key", APP_KEY),))
        assert forbidden.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
        assert (await stub.ListModels(request, metadata=admin)).data is not None
        await stub.ListModels(request, metadata=admin)
        await stub.ListModels(request, metadata=admin)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stub.ListModels(request, metadata=admin)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(limited.value.trailing_metadata() or ())
        assert 1 <= int(trailers["retry-after"]) <= 60
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            [m async for m in stub.Chat(pb.ChatRequest(model="m1"))]
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await channel.close()
        await server.stop()


# --- WebSocket ----------------------------------------------------------------------------------


async def test_websocket_keys_by_header_or_token_and_scopes(make_runtime: MakeRuntime) -> None:
    async with serve_ws(make_runtime, KEYS, "handlers.routes.events_watch.scope=admin") as served:
        async with served.connect("/ws/chat") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert_error((await turn(ws))[-1], "authentication_error", "missing_api_key")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        (await served.engine()).enqueue(["Hi"])
        async with served.connect(f"/ws/chat?token={APP_KEY}") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"
        async with served.connect("/ws/models", additional_headers=APP) as ws:
            assert_error(await recv(ws), "permission_error", "insufficient_scope")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        async with served.connect("/ws/models", additional_headers=ADMIN) as ws:
            frame = None
            for _ in range(50):  # until the feed has subscribed and passes an event on
                await served.runtime.events.publish(BusEvent("model.loaded", "test", {}))
                with contextlib.suppress(TimeoutError):
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
                    break
            assert frame is not None and frame.get("type") != "error", frame


# --- GraphQL ------------------------------------------------------------------------------------


async def test_graphql_keys_and_scopes(make_runtime: MakeRuntime) -> None:
    api = await start_graphql(make_runtime, KEYS)
    async with api.http:
        refused = only_error(await api("{ models { id } }"))
        assert refused["extensions"]["status"] == 401
        assert refused["extensions"]["type"] == "authentication_error"
        assert data(await api("{ models { id } }", **APP))["models"]
        forbidden = only_error(await api('mutation { loadModel(model: "m1") { id } }', **APP))
        assert forbidden["extensions"]["status"] == 403
        loaded = await api('mutation { loadModel(model: "m1") { id } }', **ADMIN)
        assert "errors" not in loaded, loaded
        api.plugin.built["m1"].enqueue(["Hel", "lo"])
        answer = data(await api(GENERATE, {"model": "m1", "prompt": "hi"}, **ADMIN))
        assert answer["generateText"]["text"] == "Hello"


async def test_rate_limits_on_websocket_and_graphql_say_when_to_retry(
    make_runtime: MakeRuntime,
) -> None:
    limit = "auth.limits.requests_per_minute=1"
    api = await start_graphql(make_runtime, KEYS, limit)
    api.runtime.auth.limiter.clock = FakeClock(1_000_050.0)
    async with api.http:
        assert data(await api("{ models { id } }", **APP))["models"]
        limited = only_error(await api("{ models { id } }", **APP))
        assert limited["extensions"]["status"] == 429
        assert limited["extensions"]["type"] == "rate_limit_error"
        assert limited["extensions"]["retryAfter"] == 30
    async with serve_ws(make_runtime, KEYS, limit) as served:
        served.runtime.auth.limiter.clock = FakeClock(1_000_050.0)
        (await served.engine()).enqueue(["Hi"])
        async with served.connect("/ws/chat", additional_headers=APP) as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"
            await send(ws, {"message": "again", "model": "m1"})
            frame = (await turn(ws))[-1]
            assert_error(frame, "rate_limit_error", "requests_per_minute")
            assert frame["retry_after"] == 30
            (await served.engine()).enqueue(["Hi"])
            served.runtime.auth.limiter.clock = FakeClock(1_000_080.0)
            await send(ws, {"message": "later", "model": "m1"})  # the socket stays open
            assert (await turn(ws))[-1]["type"] == "done"


# --- secrets ------------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging(LoggingConfig(level="DEBUG", format=LogFormat.json), stream=out)
    yield out
    structlog.contextvars.clear_contextvars()
    configure_logging(LoggingConfig(level="WARNING"))


async def test_keys_never_reach_logs_status_or_printed_config(
    make_runtime: MakeRuntime, log_stream: io.StringIO
) -> None:
    runtime = make_runtime(KEYS, builtins=[ScriptedEngines()])
    shown = [
        json.dumps(runtime.redacted_config(), default=str),
        json.dumps(runtime.plan(), default=str),
        repr(runtime.settings),  # the plain keys were dropped once hashed
    ]
    async with await http_client(runtime) as http:
        for headers in (ADMIN, APP, {"x-api-key": "tk-wrong"}):
            for path in ("/integrations/status", "/admin/requests", "/v1/models"):
                response = await http.get(path, headers=headers)
                shown.append(response.text)
                shown.append(json.dumps(dict(response.headers)))
    # A WebSocket `token` parameter in a logged URL is masked like any token.
    structlog.get_logger("tiffin.test").info(f"GET /ws/chat?token={APP_KEY}&lang=en")
    logged = log_stream.getvalue()
    assert "token=***" in logged
    assert logged  # DEBUG logging ran
    for text in [logged, *shown]:
        assert ADMIN_KEY not in text and APP_KEY not in text


# --- CLI ----------------------------------------------------------------------------------------


def test_keys_create_prints_a_new_key_once_and_how_to_use_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["keys", "create", "--scope", "admin", "--name", "ci"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0]
    assert key.startswith("tk-") and len(key) > 40
    assert f"export TIFFIN_KEY_CI={key}" in out
    assert "{name: ci, key: \"${oc.env:TIFFIN_KEY_CI,''}\", scopes: [admin]}" in out
    assert f"key_sha256: {hash_key(key)}" in out
    assert main(["keys", "create", "--name", "ci"]) == 0
    assert capsys.readouterr().out.splitlines()[0] != key


def test_keys_list_shows_names_never_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIFFIN_API_KEY", APP_KEY)
    monkeypatch.delenv("TIFFIN_ADMIN_KEY", raising=False)
    assert main(["keys", "list", "env=prod"]) == 0
    out = capsys.readouterr().out
    assert "auth: enforced" in out
    assert "admin  scopes=admin  unset" in out and "client  scopes=inference  set" in out
    assert APP_KEY not in out
    assert main(["keys", "revoke", "client"]) == 1
    assert "database" in capsys.readouterr().err


def test_a_configured_key_turns_auth_on_in_dev(
    make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIFFIN_API_KEY", APP_KEY)
    runtime = make_runtime("env=dev")
    assert runtime.plan()["auth"] == {"enforced": True, "keys": ["client"]}


class AnswersEverything:
    """A plugin that answers every request in `before_request` (a response cache, say)."""

    def __init__(self) -> None:
        self.principals: list[Any] = []

    @hookimpl
    def before_request(self, event: Any, ctx: Any) -> dict[str, str]:
        self.principals.append(event.principal)
        return {"answered": "by plugin"}


async def test_no_plugin_answers_before_the_key_is_checked(make_runtime: MakeRuntime) -> None:
    plugin = AnswersEverything()
    runtime = make_runtime(KEYS, builtins=[plugin, ScriptedEngines()])
    async with await http_client(runtime) as http:
        assert (await http.get("/v1/models")).status_code == 401
        assert plugin.principals == []  # auth refused before the plugin ran
        answered = await http.get("/v1/models", headers=APP)
        assert answered.json() == {"answered": "by plugin"}
        assert [p.name for p in plugin.principals] == ["app"]  # and the plugin saw who
