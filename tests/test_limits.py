"""Request limits (runtime/limits.py and the transports' size limits), on the scripted engine:
`limits.max_tokens` (400), `limits.max_concurrent_streams` per client (429 + Retry-After),
`server.max_body_bytes` for gRPC messages and WebSocket frames. Each is answered in the
protocol's own error shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config import ModelConfig
from runtime.dispatch import Event
from runtime.engines.base import ModelSpec
from runtime.transports.http import create_app
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc
from tests.conftest import eventually
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
