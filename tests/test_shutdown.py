"""Graceful shutdown in-process, on the scripted engine: `Runtime.drain()` refuses new requests
with 503, lets in-flight ones finish within the drain timeout, and then ends the streams still
open with finish_reason "abort". The served process under SIGTERM is in
tests/test_shutdown_served.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.errors import ConfigError
from runtime.transports.http import create_app
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc
from tests.conftest import eventually
from tests.scripted_engine import ScriptedEngine
from tests.test_grpc import serve as serve_grpc
from tests.test_openai_api import ScriptedEngines, chat, sse_frames
from tests.test_ws import Turnstile, recv, send, turn
from tests.test_ws import serve as serve_ws

MakeRuntime = Callable[..., Runtime]


class Api:
    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, engine: ScriptedEngine) -> None:
        self.runtime = runtime
        self.http = http
        self.engine = engine


@pytest.fixture
async def api(make_runtime: MakeRuntime) -> AsyncIterator[Api]:
    plugin = ScriptedEngines()
    runtime = make_runtime(builtins=[plugin])
    runtime.models.register(
        ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted", provider="local")
    )
    await runtime.start()
    await runtime.models.load("m1")
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        yield Api(runtime, http, plugin.built["m1"])


def held(api: Api, pieces: list[str | Exception]) -> asyncio.Event:
    """The next generation yields `pieces`, each once the returned gate is set."""
    api.engine.enqueue(pieces)
    gate = asyncio.Event()
    api.engine.gate = gate
    return gate


async def test_drain_with_nothing_in_flight_returns_at_once_and_refuses_new_requests(
    api: Api,
) -> None:
    assert api.runtime.ready
    assert await api.runtime.drain(timeout_s=30) == 0
    assert not api.runtime.ready
    response = await api.http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "shutting_down"
    assert response.json()["error"]["type"] == "server_error"


async def test_a_stream_that_ends_within_the_drain_timeout_finishes_normally(api: Api) -> None:
    gate = held(api, ["a", "b"])
    request = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat(stream=True)))
    await eventually(lambda: len(api.runtime.dispatcher.in_flight) == 1)
    drain = asyncio.ensure_future(api.runtime.drain(timeout_s=30))
    await asyncio.sleep(0.1)
    assert not drain.done()  # waiting for the stream
    gate.set()
    assert await drain == 0
    frames = sse_frames((await request).text)
    assert frames[-1] == "[DONE]"
    finishes = [c["finish_reason"] for f in frames[:-1] for c in json.loads(f)["choices"]]
    assert finishes[-1] == "stop" and "abort" not in finishes


async def test_a_stream_still_open_at_the_drain_timeout_ends_with_abort(api: Api) -> None:
    gate = held(api, ["a", "b", "c", "d"])
    request = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat(stream=True)))
    await eventually(lambda: len(api.runtime.dispatcher.in_flight) == 1)
    drain = asyncio.ensure_future(api.runtime.drain(timeout_s=0.2))
    await eventually(api.runtime.dispatcher.abort.is_set)
    gate.set()  # the engine produces its next token; the stream ends there
    assert await drain == 1
    response = await request
    assert response.status_code == 200
    frames = sse_frames(response.text)
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    assert "error" not in response.text
    assert api.engine.closed == 1  # the engine's generation was closed
    assert not api.runtime.dispatcher.in_flight


async def test_a_whole_completion_still_running_at_the_timeout_answers_with_abort(
    api: Api,
) -> None:
    api.engine.enqueue(["a", "b", "c"])
    api.engine.gate = Turnstile(1)  # "a", then the model works on "b" until it is aborted
    request = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat()))
    await eventually(lambda: len(api.runtime.dispatcher.in_flight) == 1)
    assert await api.runtime.drain(timeout_s=0.2) == 1
    body = (await request).json()
    assert body["choices"][0]["finish_reason"] == "abort"
    assert body["choices"][0]["message"]["content"] == "a"


def test_the_graceful_timeout_must_outlast_the_drain(make_runtime: MakeRuntime) -> None:
    with pytest.raises(ConfigError, match=r"server\.graceful_timeout_s"):
        make_runtime("server.drain_timeout_s=30", "server.graceful_timeout_s=30")


async def test_a_ws_turn_open_at_the_drain_timeout_ends_with_a_done_frame_abort(
    make_runtime: MakeRuntime,
) -> None:
    async with serve_ws(make_runtime) as served, served.connect() as ws:
        engine = await served.engine()
        engine.enqueue(["a", "b", "c"])
        engine.gate = gate = asyncio.Event()
        await send(ws, {"message": "hi", "model": "m1"})
        await eventually(lambda: bool(engine.requests))
        drain = asyncio.ensure_future(served.runtime.drain(timeout_s=0.2))
        await eventually(served.runtime.dispatcher.abort.is_set)
        gate.set()
        frames = await turn(ws)
        assert await drain == 1
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "abort"


async def test_a_grpc_stream_open_at_the_drain_timeout_ends_with_a_final_message_abort(
    make_runtime: MakeRuntime,
) -> None:
    plugin = ScriptedEngines()
    runtime = make_runtime("transports.grpc=true", builtins=[plugin])
    await runtime.start()
    runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
    await runtime.models.load("m1")
    engine = plugin.built["m1"]
    engine.enqueue(["a", "b", "c"])
    engine.gate = gate = asyncio.Event()
    server, channel = await serve_grpc(runtime)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.ChatRequest(model="m1", messages=[pb.ChatMessage(role="user", content="hi")])
        call = asyncio.ensure_future(_collect(stub.Chat(request)))
        await eventually(lambda: bool(engine.requests))
        drain = asyncio.ensure_future(runtime.drain(timeout_s=0.2))
        await eventually(runtime.dispatcher.abort.is_set)
        gate.set()
        messages = await call
        assert await drain == 1
        assert messages[-1].finish_reason == "abort"
        # Meanwhile new calls are refused: 503 is UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _collect(stub.Chat(request))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()
        await server.stop(0)


async def _collect(call: Any) -> list[Any]:
    return [message async for message in call]


async def test_open_feeds_end_when_the_drain_begins_and_do_not_hold_it(
    make_runtime: MakeRuntime,
) -> None:
    async with (
        serve_ws(make_runtime) as served,
        served.connect("/ws/models") as events,
        served.connect("/ws/metrics?interval=60") as metrics,
    ):
        await recv(metrics)  # the first snapshot: the feed is running
        await eventually(lambda: len(served.runtime.dispatcher.in_flight) == 2)
        started = asyncio.get_running_loop().time()
        assert await served.runtime.drain(timeout_s=30) == 0
        assert asyncio.get_running_loop().time() - started < 5
        for ws in (events, metrics):
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


async def test_a_stream_stalled_on_its_model_is_aborted_without_waiting_for_it(api: Api) -> None:
    api.engine.enqueue(["a", "b", "c"])
    api.engine.gate = Turnstile(1)  # "a" passes, then the model never produces another chunk
    request = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat(stream=True)))
    await eventually(lambda: len(api.runtime.dispatcher.in_flight) == 1)
    assert await asyncio.wait_for(api.runtime.drain(timeout_s=0.2), 5) == 1
    frames = sse_frames((await request).text)
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "abort"
    assert frames[-1] == "[DONE]"
    assert api.engine.closed == 1  # the model's stream was closed, not left waiting


async def test_a_request_queued_for_its_model_is_aborted_too(api: Api) -> None:
    api.engine.gate = asyncio.Event()  # the first request holds the model; the second queues
    requests = [
        asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat(stream=True)))
        for _ in range(2)
    ]
    await eventually(lambda: len(api.runtime.dispatcher.in_flight) == 2)
    assert await asyncio.wait_for(api.runtime.drain(timeout_s=0.2), 5) == 2
    for request in requests:
        frames = sse_frames((await request).text)
        assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "abort"
    assert not api.runtime.dispatcher.in_flight
    assert api.runtime.models.models["m1"].in_flight == 0
