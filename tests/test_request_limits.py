"""Request limits (hooks/request_limits.py and the transports' size limits), on the scripted engine:
`limits.max_tokens` (400), `limits.max_concurrent_streams` per client (429 + Retry-After),
`server.max_body_bytes` for gRPC messages and WebSocket frames, a full model queue (429) and
the stream and max_tokens limits on every transport at once. Each is answered in the
protocol's own error shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc
from runtime.types import Event
from tests.conftest import eventually, free_port
from tests.scripted_engine import ScriptedEngine
from tests.test_auth import ADMIN, APP, KEYS
from tests.test_grpc import serve as serve_grpc
from tests.test_openai_api import ScriptedEngines, chat
from tests.test_ws import assert_error, recv, send
from tests.test_ws import serve as serve_ws

MakeRuntime = Callable[..., Runtime]


class PrincipalFromHeader:
    """Stands in for the auth plugin: `x-user: alice` makes alice the request's principal."""

    @hookimpl
    def before_request(self, event: Event, ctx: Any) -> None:
        user = event.headers.get("x-user")
        if user:
            event.principal = ctx.principal = SimpleNamespace(name=user)


class Api:
    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, plugin: ScriptedEngines) -> None:
        self.runtime = runtime
        self.http = http
        self.plugin = plugin

    async def engine(self, model: str) -> ScriptedEngine:
        await self.runtime.models.load(model)
        return self.plugin.built[model]

    def post(self, body: dict[str, Any], user: str | None = None) -> Any:
        headers = {"x-user": user} if user else {}
        return self.http.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture
async def api(make_runtime: MakeRuntime) -> AsyncIterator[Api]:
    plugin = ScriptedEngines()
    runtime = make_runtime(
        "limits.max_tokens=100",
        "limits.max_concurrent_streams=1",
        "limits.retry_after_s=2",
        builtins=[plugin, PrincipalFromHeader()],
    )
    for model in ("m1", "m2"):
        runtime.models.register(
            ModelSpec(ModelConfig(id=model, source="x"), Path("x"), "scripted", provider="local")
        )
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        yield Api(runtime, http, plugin)


async def test_max_tokens_over_the_cap_is_a_400_naming_it(api: Api) -> None:
    engine = await api.engine("m1")
    response = await api.post(chat(max_tokens=101))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and error["code"] == "max_tokens_too_large"
    assert "100" in error["message"] and "101" in error["message"]
    assert not engine.requests  # refused before the model saw it
    assert (await api.post(chat(max_tokens=100))).status_code == 200
    assert (await api.post(chat())).status_code == 200  # unset: capped, not refused
    assert [r.max_tokens for r in engine.requests] == [100, 100]


async def test_one_stream_too_many_per_client_is_a_429_with_retry_after(api: Api) -> None:
    held = await api.engine("m1")
    held.gate = asyncio.Event()
    first = asyncio.ensure_future(api.post(chat(stream=True), user="alice"))
    await eventually(lambda: bool(held.requests))
    second = await api.post(chat(model="m2", stream=True), user="alice")
    assert second.status_code == 429
    assert second.headers["retry-after"] == "2"
    error = second.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "too_many_streams"
    assert "alice" in error["message"]
    # Another client has its own budget; whole (non-streamed) answers are not streams.
    assert (await api.post(chat(model="m2", stream=True), user="bob")).status_code == 200
    assert (await api.post(chat(model="m2"), user="alice")).status_code == 200
    held.gate.set()
    assert (await first).status_code == 200
    # The finished stream gave its slot back.
    assert (await api.post(chat(model="m2", stream=True), user="alice")).status_code == 200


async def test_without_a_principal_clients_share_one_anonymous_budget(api: Api) -> None:
    held = await api.engine("m1")
    held.gate = asyncio.Event()
    first = asyncio.ensure_future(api.post(chat(stream=True)))
    await eventually(lambda: bool(held.requests))
    refused = await api.post(chat(model="m2", stream=True))
    assert refused.status_code == 429 and "anonymous" in refused.json()["error"]["message"]
    held.gate.set()
    await first
    limits = api.runtime.plugins.get_plugin("tiffin.builtin.RequestLimits")
    assert limits.open == {} and limits.holders == {}  # nothing leaks


async def test_limits_are_off_by_default(make_runtime: MakeRuntime) -> None:
    plugin = ScriptedEngines()
    runtime = make_runtime(builtins=[plugin])
    runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        response = await http.post("/v1/chat/completions", json=chat(max_tokens=100000))
    assert response.status_code == 200


async def test_grpc_refuses_a_message_over_max_body_bytes_and_caps_max_tokens(
    make_runtime: MakeRuntime,
) -> None:
    plugin = ScriptedEngines()
    runtime = make_runtime(
        "transports.grpc=true",
        "server.max_body_bytes=2000",
        "limits.max_tokens=10",
        builtins=[plugin],
    )
    await runtime.start()
    runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
    server, channel = await serve_grpc(runtime)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        big = pb.ChatRequest(model="m1", messages=[pb.ChatMessage(role="user", content="x" * 3000)])
        with pytest.raises(grpc.aio.AioRpcError) as too_large:
            [m async for m in stub.Chat(big)]
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        request = pb.ChatRequest(
            model="m1", messages=[pb.ChatMessage(role="user", content="hi")], max_tokens=11
        )
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            [m async for m in stub.Chat(request)]
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens" in (too_many.value.details() or "")
    finally:
        await channel.close()
        await server.stop(0)


async def test_ws_answers_a_frame_over_max_body_bytes_with_a_413_error_frame(
    make_runtime: MakeRuntime,
) -> None:
    async with (
        serve_ws(make_runtime, "server.max_body_bytes=2000") as served,
        served.connect() as ws,
    ):
        await send(ws, {"message": "é" * 1500, "model": "m1"})  # 1500 characters, 3000 bytes
        error = await recv(ws)
        assert_error(error, "invalid_request_error", "request_too_large")
        await send(ws, {"message": "small", "model": "m1"})
        assert (await recv(ws))["type"] == "start"  # the socket stays open


async def test_with_auth_each_api_key_has_its_own_stream_budget(make_runtime: MakeRuntime) -> None:
    plugin = ScriptedEngines()
    runtime = make_runtime(KEYS, "limits.max_concurrent_streams=1", builtins=[plugin])
    for model in ("m1", "m2"):
        runtime.models.register(ModelSpec(ModelConfig(id=model, source="x"), Path("x"), "scripted"))
    await runtime.start()
    await runtime.models.load("m1")
    held = plugin.built["m1"]
    held.gate = asyncio.Event()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        url = "/v1/chat/completions"
        first = asyncio.ensure_future(http.post(url, json=chat(stream=True), headers=APP))
        await eventually(lambda: bool(held.requests))
        again = await http.post(url, json=chat(model="m2", stream=True), headers=APP)
        assert again.status_code == 429 and "app already has 1" in again.json()["error"]["message"]
        other = await http.post(url, json=chat(model="m2", stream=True), headers=ADMIN)
        assert other.status_code == 200
        held.gate.set()
        assert (await first).status_code == 200


# --- on every transport at once ------------------------------------------------------------------


class Everywhere:
    """One runtime served over HTTP/WebSocket/GraphQL (uvicorn on a loopback port) and gRPC,
    with model m1 on a scripted engine held at its gate, and the request-log records."""

    def __init__(self, runtime: Runtime, port: int, channel: grpc.aio.Channel) -> None:
        self.runtime = runtime
        self.base = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws/chat"
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.records: list[Any] = []
        runtime.live.sinks.append(self.records.append)


@asynccontextmanager
async def everywhere(
    make_runtime: MakeRuntime, config: ModelConfig, *overrides: str
) -> AsyncIterator[tuple[Everywhere, ScriptedEngine]]:
    plugin = ScriptedEngines()
    runtime = make_runtime(
        "transports.grpc=true", "server.ws_ping_interval_s=0", *overrides, builtins=[plugin]
    )
    runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    await runtime.start()
    await runtime.models.load(config.id)
    held = plugin.built[config.id]
    held.gate = asyncio.Event()
    grpc_server, channel = await serve_grpc(runtime)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        yield Everywhere(runtime, port, channel), held
    finally:
        held.gate.set()
        server.should_exit = True
        await serving
        await channel.close()
        await grpc_server.stop(0)


def grpc_chat(**fields: Any) -> pb.ChatRequest:
    return pb.ChatRequest(
        model="m1", messages=[pb.ChatMessage(role="user", content="hi")], **fields
    )


async def test_a_full_model_queue_is_refused_in_each_protocols_own_shape(
    make_runtime: MakeRuntime,
) -> None:
    """max_queue=0: one generation runs, the next request for the model is refused with 429
    and Retry-After (vLLM and TGI answer an overloaded server the same way) — OpenAI error JSON
    on HTTP (streamed or not), RESOURCE_EXHAUSTED on gRPC, an error frame on the WebSocket
    (the socket stays usable), a GraphQL error with the status. Each refusal is a request-log
    record with its transport and status 429, and the running stream is untouched."""
    config = ModelConfig(id="m1", source="x", max_queue=0, timeout_s=300)
    async with everywhere(make_runtime, config) as (api, held):
        runtime = api.runtime
        async with httpx.AsyncClient(base_url=api.base) as http:
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat()))
            await eventually(lambda: runtime.models.get("m1").in_flight == 1)

            for stream in (False, True):
                refused = await http.post("/v1/chat/completions", json=chat(stream=stream))
                assert refused.status_code == 429
                assert refused.headers["content-type"].startswith("application/json")
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert refused.json()["error"]["code"] == "queue_full"
                assert int(refused.headers["retry-after"]) >= 1

            with pytest.raises(grpc.aio.AioRpcError) as exhausted:
                [m async for m in api.inference.Chat(grpc_chat(), timeout=5)]
            assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "m1" in (exhausted.value.details() or "")

            async with connect(api.ws, open_timeout=5) as ws:
                await send(ws, {"id": "t1", "message": "hi", "model": "m1"})
                assert (await recv(ws)) == {"type": "start", "id": "t1"}
                error = await recv(ws)
                assert error["id"] == "t1"
                assert_error(error, "rate_limit_error", "queue_full")
                await send(ws, {"type": "ping"})
                assert (await recv(ws)) == {"type": "pong"}  # the socket stays usable

            document = 'mutation { generateText(model: "m1", prompt: "hi") { text } }'
            answer = (await http.post("/graphql", json={"query": document})).json()
            extensions = answer["errors"][0]["extensions"]
            assert (extensions["status"], extensions["code"]) == (429, "queue_full")
            assert extensions["retryAfter"] >= 1

            held.gate.set()
            assert (await first).status_code == 200
        assert runtime.models.get("m1").in_flight == 0
        refusals = sorted((r.transport, r.status) for r in api.records if r.status == 429)
        transports = ["graphql", "grpc", "http", "http", "ws"]
        assert refusals == [(transport, 429) for transport in transports]


async def test_stream_and_max_tokens_limits_on_grpc_and_websocket(
    make_runtime: MakeRuntime,
) -> None:
    """The per-client stream budget and the max_tokens cap, which HTTP's tests cover, hold on
    the streaming transports too: RESOURCE_EXHAUSTED / INVALID_ARGUMENT on gRPC, error frames
    (too_many_streams, max_tokens_too_large) on the WebSocket."""
    config = ModelConfig(id="m1", source="x", timeout_s=300)
    limits = ("limits.max_concurrent_streams=1", "limits.max_tokens=10")
    async with everywhere(make_runtime, config, *limits) as (api, held):
        async with httpx.AsyncClient(base_url=api.base) as http:
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=chat(stream=True)))
            await eventually(lambda: bool(held.requests))

            with pytest.raises(grpc.aio.AioRpcError) as exhausted:
                [m async for m in api.inference.Chat(grpc_chat(), timeout=5)]
            assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limits.max_concurrent_streams" in (exhausted.value.details() or "")

            async with connect(api.ws, open_timeout=5) as ws:
                await send(ws, {"id": "t1", "message": "hi", "model": "m1"})
                frames = [await recv(ws), await recv(ws)]
                assert frames[0] == {"type": "start", "id": "t1"}
                assert_error(frames[1], "rate_limit_error", "too_many_streams")

                held.gate.set()
                assert (await first).status_code == 200
                await send(ws, {"id": "t2", "message": "hi", "model": "m1", "max_tokens": 11})
                frames = [await recv(ws), await recv(ws)]
                error = assert_error(frames[1], "invalid_request_error", "max_tokens_too_large")
                assert error["param"] == "max_tokens"

            with pytest.raises(grpc.aio.AioRpcError) as too_many:
                [m async for m in api.inference.Chat(grpc_chat(max_tokens=11), timeout=5)]
            assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
