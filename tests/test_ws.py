"""The WebSocket transport against the app served by uvicorn on a loopback port (httpx's
in-process transport cannot do WebSockets), with the `websockets` client, on the scripted
engine. The frame protocol is in runtime/transports/ws_frames.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from runtime.transports.ws_outbox import Close, Outbox
from runtime.types import Event, HandlerError
from tests.conftest import TEST_OVERRIDES, eventually, free_port
from tests.scripted_engine import ScriptedEngine
from tests.served import Served as ServedProcess
from tests.test_metrics import CHAT, Scrape
from tests.test_openai_api import ScriptedEngines

MakeRuntime = Callable[..., Runtime]


class Served:
    """A runtime served on a loopback port, and a way to open sockets on it."""

    def __init__(self, runtime: Runtime, plugin: ScriptedEngines, port: int) -> None:
        self.runtime = runtime
        self.plugin = plugin
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"

    async def engine(self, model: str = "m1") -> ScriptedEngine:
        await self.runtime.models.load(model)
        return self.plugin.built[model]

    def connect(self, path: str = "/ws/chat", **kwargs: Any) -> Any:
        return connect(self.ws + path, open_timeout=5, close_timeout=2, **kwargs)


@asynccontextmanager
async def serve(
    make_runtime: MakeRuntime, *overrides: str, plugins: tuple[object, ...] = ()
) -> AsyncIterator[Served]:
    plugin = ScriptedEngines()
    runtime = make_runtime("server.ws_ping_interval_s=0", *overrides, builtins=[*plugins, plugin])
    await runtime.start()
    runtime.models.register(
        ModelSpec(ModelConfig(id="m1", source="x", timeout_s=5), Path("x"), "scripted")
    )
    port = free_port()
    config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        yield Served(runtime, plugin, port)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def served(make_runtime: MakeRuntime) -> AsyncIterator[Served]:
    async with serve(make_runtime) as served:
        yield served


async def send(ws: ClientConnection, frame: Any) -> None:
    await ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert isinstance(frame, dict)
    return frame


async def turn(ws: ClientConnection) -> list[dict[str, Any]]:
    """Every frame of one turn, up to its `done` or `error` frame."""
    frames = [await recv(ws)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    return frames


def assert_error(frame: dict[str, Any], type_: str, code: str | None = None) -> dict[str, Any]:
    assert frame["type"] == "error"
    error = frame["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    if code is not None:
        assert error["code"] == code
    return dict(error)


class Turnstile(asyncio.Event):
    """A scripted engine's gate that lets `passes` pieces through, then holds until set()."""

    def __init__(self, passes: int) -> None:
        super().__init__()
        self.passes = passes

    async def wait(self) -> bool:  # type: ignore[override]
        if self.passes > 0:
            self.passes -= 1
            return True
        return await super().wait()


async def test_chat_streams_token_frames_then_done_with_usage(served: Served) -> None:
    (await served.engine()).enqueue(["Hel", "lo"])
    async with served.connect() as ws:
        await send(ws, {"message": "Hello, AI!", "model": "m1"})
        frames = await turn(ws)
    turn_id = frames[0]["id"]
    assert frames == [
        {"type": "start", "id": turn_id},
        {"type": "token", "id": turn_id, "content": "Hel"},
        {"type": "token", "id": turn_id, "content": "lo"},
        {
            "type": "done",
            "id": turn_id,
            "model": "m1",
            "message": "Hello",  # what the platform guide's example reads
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    ]


async def test_messages_and_openai_parameters_reach_the_handler(served: Served) -> None:
    engine = await served.engine()
    async with served.connect() as ws:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]
        frame = {"type": "chat", "id": "t-1", "model": "m1", "messages": messages}
        await send(ws, {**frame, "max_tokens": 7, "temperature": 0, "stop": ["\n"]})
        frames = await turn(ws)
    assert {f["id"] for f in frames} == {"t-1"}
    assert frames[-1]["message"] == "ok"
    request = engine.requests[-1]
    assert request.messages == messages
    assert request.max_tokens == 7 and request.temperature == 0 and request.stop == ["\n"]


async def test_several_turns_on_one_socket_keep_the_conversation(served: Served) -> None:
    engine = await served.engine()
    engine.enqueue(["Hello"])
    engine.enqueue(["Again"])
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1"})
        first = await turn(ws)
        await send(ws, {"message": "once more", "model": "m1"})
        second = await turn(ws)
    assert first[-1]["message"] == "Hello" and second[-1]["message"] == "Again"
    assert first[0]["id"] != second[0]["id"]
    assert engine.requests[-1].messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "once more"},
    ]


async def test_a_turn_with_tools_sends_the_calls_and_remembers_them(served: Served) -> None:
    engine = await served.engine()
    engine.enqueue(['{"name": "get_weather", "argu', 'ments": {"city": "Par', 'is"}}'])
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with served.connect() as ws:
        await send(
            ws, {"message": "Weather?", "model": "m1", "tools": [tool], "tool_choice": named}
        )
        frames = await turn(ws)
        engine.enqueue(["Sunny"])
        await send(ws, {"message": "Thanks", "model": "m1"})
        await turn(ws)
    call = frames[1]["call"]
    assert [f["type"] for f in frames] == ["start", "tool_call", "done"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert frames[-1]["finish_reason"] == "tool_calls" and frames[-1]["tool_calls"] == [call]
    assert frames[-1]["message"] == ""
    assert engine.requests[-1].messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call],
    }


async def test_cancel_mid_stream_frees_the_engine_and_the_socket_goes_on(served: Served) -> None:
    engine = await served.engine()
    engine.gate = Turnstile(passes=1)
    engine.enqueue(["a", "b", "c"])
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1"})
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["content"] == "a"
        # A second message while the turn runs is refused; the turn goes on.
        await send(ws, {"message": "too soon", "model": "m1"})
        assert_error(await recv(ws), "invalid_request_error", "turn_in_progress")
        await send(ws, {"type": "cancel"})
        done = await recv(ws)
        assert done["type"] == "done"
        assert done["finish_reason"] == "cancelled" and done["message"] == "a"
        assert engine.closed == 1  # the generation was closed before `done` was sent
        engine.gate = None
        await send(ws, {"message": "hi", "model": "m1"})
        assert (await turn(ws))[-1]["finish_reason"] == "stop"
    assert len(engine.requests) == 2


async def test_a_turn_past_its_deadline_is_a_504_frame(make_runtime: MakeRuntime) -> None:
    async with serve(make_runtime, "server.request_timeout_s=0.3") as served:
        engine = await served.engine()
        engine.gate = asyncio.Event()
        async with served.connect() as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            frames = await turn(ws)
            assert (
                assert_error(frames[-1], "timeout")["message"] == "the turn ran past its deadline"
            )
            assert engine.closed == 1
            engine.gate = None
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"


async def test_turns_are_counted_as_ws_requests(served: Served) -> None:
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1"})
        await turn(ws)
    async with httpx.AsyncClient() as http:
        text = (await http.get(served.http + "/metrics")).text
    scrape = Scrape(text)
    assert scrape.value("llm_requests_total", endpoint=CHAT, transport="ws", status="200") == 1


async def test_a_client_that_leaves_mid_turn_frees_the_engine(served: Served) -> None:
    engine = await served.engine()
    engine.gate = asyncio.Event()
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1"})
        assert (await recv(ws))["type"] == "start"
        await eventually(lambda: len(engine.requests) == 1)
    await eventually(lambda: engine.closed == 1)


async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(
    served: Served,
) -> None:
    async with served.connect() as ws:
        for frame, code in [
            ("not json", "invalid_json"),
            ("[1, 2]", "invalid_frame"),
            ({"type": 5}, "invalid_frame"),
            ({"type": "dance"}, "invalid_frame"),
            ({"model": "m1"}, "invalid_frame"),
            ({"message": 3, "model": "m1"}, "invalid_frame"),
            ({"message": "hi", "messages": [], "model": "m1"}, "invalid_frame"),
            ({"message": "hi", "id": "no spaces please"}, "invalid_frame"),
            (b"\x00binary", "invalid_frame"),
        ]:
            await send(ws, frame)
            error = await recv(ws)
            assert_error(error, "invalid_request_error", code)
            assert error["id"] is None
        # Errors from the handler belong to the turn that caused them.
        await send(ws, {"id": "bad-model", "message": "hi", "model": "nope"})
        assert [f["type"] for f in await turn(ws)] == ["start", "error"]
        await send(ws, {"id": "bad-param", "message": "hi", "model": "m1", "temperature": "hot"})
        frames = await turn(ws)
        assert assert_error(frames[-1], "invalid_request_error")["param"] == "temperature"
        assert frames[-1]["id"] == "bad-param"
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        await send(ws, {"message": "still here?", "model": "m1"})
        assert (await turn(ws))[-1]["message"] == "ok"


class RequireToken:
    """A `before_request` plugin standing in for auth: `Bearer sesame` or 401."""

    def __init__(self) -> None:
        self.seen: list[Event] = []

    @hookimpl
    def before_request(self, event: Event, ctx: Any) -> None:
        self.seen.append(event)
        if event.headers.get("authorization") != "Bearer sesame":
            raise HandlerError(401, "a valid API key is required", type="authentication_error")


async def test_auth_by_header_or_token_parameter_and_1008_when_refused(
    make_runtime: MakeRuntime,
) -> None:
    auth = RequireToken()
    async with serve(make_runtime, plugins=(auth,)) as served:
        headers = {"Authorization": "Bearer sesame"}
        async with served.connect(additional_headers=headers) as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"
        async with served.connect("/ws/chat?token=sesame&lang=en") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"
        assert [e.transport for e in auth.seen] == ["ws", "ws"]
        assert auth.seen[-1].query == {"lang": "en"}  # the token is not a handler's business
        async with served.connect("/ws/chat?token=wrong") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            frames = await turn(ws)
            assert_error(frames[-1], "authentication_error")
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


class Replaced:
    """Replaces `openai.chat_completions` by name: every transport must reach the new one."""

    @hookimpl
    def register_handlers(self, register: Callable[..., None]) -> None:
        async def chat(event: Event, ctx: Any) -> dict[str, Any]:
            content = f"plugin answer over {event.transport}"
            return {
                "object": "chat.completion",
                "model": "plugin",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }

        register("openai.chat_completions", chat)


async def test_ws_chat_reaches_the_same_handler_as_http(make_runtime: MakeRuntime) -> None:
    async with serve(make_runtime, plugins=(Replaced(),)) as served:
        async with httpx.AsyncClient() as http:
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
            response = await http.post(served.http + "/v1/chat/completions", json=body)
        assert response.json()["choices"][0]["message"]["content"] == "plugin answer over http"
        async with served.connect() as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            frames = await turn(ws)
    assert [f["type"] for f in frames] == ["start", "token", "done"]
    assert frames[-1]["message"] == "plugin answer over ws"
    assert frames[-1]["model"] == "plugin"


async def test_server_pings_keep_the_socket_alive(make_runtime: MakeRuntime) -> None:
    async with serve(make_runtime, "server.ws_ping_interval_s=0.05") as served:
        async with served.connect() as ws:
            assert await recv(ws) == {"type": "ping"}
            assert await recv(ws) == {"type": "ping"}


async def test_websocket_off_serves_no_socket(make_runtime: MakeRuntime) -> None:
    async with serve(make_runtime, "transports.websocket=false") as served:
        with pytest.raises(InvalidStatus):
            async with served.connect():
                pass


async def test_a_full_chat_outbox_makes_the_sender_wait() -> None:
    outbox = Outbox(2, drop_oldest=False)
    await outbox.put({"n": 1})
    await outbox.put({"n": 2})
    third = asyncio.ensure_future(outbox.put({"n": 3}))
    await asyncio.sleep(0.01)
    assert not third.done()  # backpressure: the generation waits for the reader
    outbox.put_control({"type": "pong"})
    assert await outbox.get() == {"type": "pong"}  # control frames jump the queue
    assert await outbox.get() == {"n": 1}
    await asyncio.wait_for(third, 1)
    assert [await outbox.get(), await outbox.get()] == [{"n": 2}, {"n": 3}]
    outbox.close(1000)
    assert await outbox.get() == Close(1000)


async def test_a_full_feed_outbox_drops_the_oldest_and_says_so() -> None:
    outbox = Outbox(2, drop_oldest=True)
    for n in range(5):
        await outbox.put({"n": n})  # never waits
    assert await outbox.get() == {"type": "dropped", "count": 3}
    assert [await outbox.get(), await outbox.get()] == [{"n": 3}, {"n": 4}]
    for _ in range(100):
        outbox.put_control({"type": "pong"})
    assert [await outbox.get() for _ in range(2)] == [{"type": "pong"}] * 2
    with pytest.raises(TimeoutError):  # control frames are bounded too
        await asyncio.wait_for(outbox.get(), 0.05)


async def test_model_events_arrive_while_another_client_loads_a_model(served: Served) -> None:
    bus = served.runtime.events
    subscribers = len(bus._subscribers)
    async with served.connect("/ws/models?types=model.*&initial=true") as ws:
        status = await recv(ws)  # subscribed: what happens from now on is seen
        assert status["type"] == "model.status" and status["data"]["model"] == "m1"
        assert set(status) == {"type", "source", "data", "time"}
        async with httpx.AsyncClient(base_url=served.http) as http:
            assert (await http.post("/admin/models/m1/load")).status_code == 200
            loaded = await recv(ws)
            assert loaded["type"] == "model.loaded" and loaded["data"]["model"] == "m1"
            assert (await http.post("/admin/models/m1/unload")).status_code == 200
            assert (await recv(ws))["type"] == "model.unloaded"
        assert len(bus._subscribers) == subscribers + 1
    await eventually(lambda: len(bus._subscribers) == subscribers)  # the socket left: unsubscribed


async def test_metrics_frames_arrive_every_interval(served: Served) -> None:
    async with served.connect("/ws/metrics?interval=0.2") as ws:
        started = asyncio.get_running_loop().time()
        frames = [await recv(ws) for _ in range(3)]
        elapsed = asyncio.get_running_loop().time() - started
    assert all("requests" in f and "models" in f for f in frames)
    assert elapsed >= 0.35  # two intervals between three frames (no upper bound: shared CPUs)
    async with served.connect("/ws/metrics?interval=0") as ws:
        assert assert_error(await recv(ws), "invalid_request_error")["param"] == "interval"
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_feeds_ask_for_auth_too(make_runtime: MakeRuntime) -> None:
    async with serve(make_runtime, plugins=(RequireToken(),)) as served:
        async with served.connect("/ws/metrics?interval=0.1&token=sesame") as ws:
            assert "requests" in await recv(ws)
            await send(ws, {"type": "ping"})
            frame = await recv(ws)
            while frame["type"] != "pong":  # metrics frames are queued ahead
                frame = await recv(ws)
            await send(ws, {"type": "cancel"})
            while frame["type"] != "error":
                frame = await recv(ws)
            assert_error(frame, "invalid_request_error", "invalid_frame")
        async with served.connect("/ws/models") as ws:
            assert_error(await recv(ws), "authentication_error")
            with pytest.raises(ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.slow
def test_python_m_runtime_serves_the_sockets(tmp_path: Path) -> None:
    """Under BentoML (`python -m runtime`), the same sockets answer on the HTTP port."""
    served = ServedProcess.start(tmp_path, *TEST_OVERRIDES)
    try:
        served.wait_for("/readyz", 200)
        url = served.url.replace("http://", "ws://")

        async def talk() -> None:
            async with connect(url + "/ws/metrics?interval=0.1", open_timeout=10) as ws:
                assert "requests" in await recv(ws)
            async with connect(url + "/ws/chat", open_timeout=10) as ws:
                await send(ws, "not json")
                assert_error(await recv(ws), "invalid_request_error", "invalid_json")

        asyncio.run(talk())
    finally:
        served.kill()
