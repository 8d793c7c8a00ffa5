"""The OpenAI-compatible API in-process, on a scripted engine: SSE framing byte by byte, and every
error case in OpenAI's shape with its status. The real model behind the same API is exercised
by tests/test_openai_client.py against a served process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from runtime.types import EMBEDDINGS, EngineError
from tests.conftest import eventually
from tests.scripted_engine import ScriptedEngine, batching
from tests.test_http import assert_openai_error

MakeRuntime = Callable[..., Runtime]


class ScriptedEngines:
    """A plugin that offers the scripted engine and keeps every instance it builds."""

    def __init__(self) -> None:
        self.built: dict[str, ScriptedEngine] = {}

    @hookimpl
    def register_engines(self, register: Callable[..., None]) -> None:
        register("scripted", self.build)

    def build(self, spec: ModelSpec) -> ScriptedEngine:
        engine = ScriptedEngine(spec)
        if spec.config.id == "embedder":
            engine.capabilities = frozenset({EMBEDDINGS})
        if spec.config.id == "broken":
            engine.fail_load = "the GPU fell off the bus"
        self.built[spec.config.id] = engine
        return engine


class Api:
    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, plugin: ScriptedEngines) -> None:
        self.runtime = runtime
        self.http = http
        self.plugin = plugin

    async def engine(self, model: str) -> ScriptedEngine:
        await self.runtime.models.load(model)
        return self.plugin.built[model]


@pytest.fixture
async def api(make_runtime: MakeRuntime) -> AsyncIterator[Api]:
    plugin = ScriptedEngines()
    runtime = make_runtime(builtins=[plugin])
    await runtime.start()
    for config in (
        ModelConfig(id="m1", source="x", aliases=["first"], max_queue=0, timeout_s=5),
        ModelConfig(id="embedder", source="x"),
        ModelConfig(id="broken", source="x", fallbacks=["m1"]),
    ):
        runtime.models.register(ModelSpec(config, Path("x"), "scripted"))
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        yield Api(runtime, http, plugin)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi"}], **fields}


def sse_frames(body: str) -> list[str]:
    """The `data:` payloads of an event stream, checking the framing on the way."""
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


async def test_chat_completion_shape_and_usage(api: Api) -> None:
    (await api.engine("m1")).enqueue(["Hel", "lo"])
    response = await api.http.post("/v1/chat/completions", json=chat(model="first"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == f"chatcmpl-{response.headers['x-request-id']}"
    assert body["model"] == "m1"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert response.headers["x-tiffin-cost"] == "0.00000000"  # m1 has no prices


@pytest.mark.parametrize("stream", [False, True])
async def test_auto_tools_in_the_models_own_syntax(api: Api, stream: bool) -> None:
    """Under "auto", a model whose chat template teaches a tool-call syntax (here Hermes, as
    the llama.cpp engine would read it from the GGUF) answers in it: the text around the call
    is content, the call a tool call; the request keeps its tools for the template, with no
    schema forced on it."""
    engine = await api.engine("m1")
    engine.tool_syntax = "hermes"
    engine.enqueue(
        [
            "Let me check. <tool",
            '_call>{"name": "get_weather", ',
            '"arguments": {"city": "Oslo"}}',
            "</tool_call>",
        ]
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    response = await api.http.post("/v1/chat/completions", json=chat(tools=[tool], stream=stream))
    assert response.status_code == 200, response.text
    if stream:
        frames = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        deltas = [c["delta"] for f in frames for c in f["choices"]]
        content = "".join(d.get("content") or "" for d in deltas)
        calls = [call for d in deltas for call in d.get("tool_calls") or []]
        finish = [c["finish_reason"] for f in frames for c in f["choices"] if c["finish_reason"]]
    else:
        choice = response.json()["choices"][0]
        content, calls = choice["message"]["content"], choice["message"]["tool_calls"]
        finish = [choice["finish_reason"]]
    assert content == "Let me check. "
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    assert finish == ["tool_calls"]
    (request,) = engine.requests
    assert request.tools == [tool] and request.json_schema is None
    assert request.messages is not None and request.messages[0]["role"] == "user"  # no prompt


async def test_chat_stream_framing(api: Api) -> None:
    (await api.engine("m1")).enqueue(["Hel", "lo", "!"])
    response = await api.http.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = sse_frames(response.text)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("content") for d in deltas[1:-1]] == ["Hel", "lo", "!"]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and finishing[0]["choices"][0]["finish_reason"] == "stop"
    assert finishing[0] is chunks[-2]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_usage_option_has_no_usage_chunk(api: Api) -> None:
    response = await api.http.post("/v1/chat/completions", json=chat(stream=True))
    chunks = [json.loads(f) for f in sse_frames(response.text)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_text_completion_stream_and_echo(api: Api) -> None:
    engine = await api.engine("m1")
    engine.enqueue([" wor", "ld"])
    body = {"model": "m1", "prompt": "hello", "echo": True}
    whole = (await api.http.post("/v1/completions", json=body)).json()
    assert whole["object"] == "text_completion"
    assert whole["choices"][0]["text"] == "hello wor" + "ld"
    engine.enqueue([" a", "b"])
    streamed = await api.http.post("/v1/completions", json={**body, "stream": True})
    frames = sse_frames(streamed.text)
    assert frames[-1] == "[DONE]"
    texts = [json.loads(f)["choices"][0]["text"] for f in frames[:-1]]
    assert "".join(texts) == "hello ab"
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_shape_and_capability_check(api: Api) -> None:
    await api.engine("embedder")  # capabilities of an unloaded model come from its engine name
    response = await api.http.post("/v1/embeddings", json={"model": "embedder", "input": ["ab"]})
    assert response.json()["data"] == [{"object": "embedding", "index": 0, "embedding": [2.0]}]
    wrong = await api.http.post("/v1/embeddings", json={"model": "m1", "input": "x"})
    assert assert_openai_error(wrong, 400, "invalid_request_error")["code"] == (
        "model_not_supported"
    )
    chat_on_embedder = await api.http.post("/v1/chat/completions", json=chat(model="embedder"))
    assert_openai_error(chat_on_embedder, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([1, 2], None),
        ("just a string", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(n=0), "n"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(top_p=0), "top_p"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(top_logprobs=2), None),
        (chat(response_format={"type": "json_schema"}), "response_format"),
        (
            chat(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "What is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
                        ],
                    }
                ]
            ),
            "messages.0.content.1",
        ),
        (chat(messages=[{"role": "tool", "content": "12:00"}]), "messages.0"),
        (
            chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="maybe"),
            "tool_choice",
        ),
        (
            chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                response_format={"type": "json_object"},
            ),
            "response_format",
        ),
    ],
)
async def test_bad_requests_are_400_naming_the_parameter(
    api: Api, body: Any, param: str | None
) -> None:
    response = await api.http.post("/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param
    assert error["message"]


async def test_invalid_json_is_400(api: Api) -> None:
    response = await api.http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert assert_openai_error(response, 400, "invalid_request_error")["code"] == "invalid_json"


async def test_a_model_card_has_slots_only_where_the_engine_batches(api: Api) -> None:
    (await api.engine("m1")).extra_stats = batching(slots_busy=2, slots_free=6)
    await api.engine("embedder")
    cards = {c["id"]: c for c in (await api.http.get("/v1/models")).json()["data"]}
    assert (cards["m1"]["slots_busy"], cards["m1"]["slots_free"]) == (2, 6)
    assert "slots_busy" not in cards["embedder"] and "slots_free" not in cards["broken"]
    assert (await api.http.get("/v1/models/m1")).json()["slots_free"] == 6


async def test_unknown_model_is_404_with_close_matches(api: Api) -> None:
    response = await api.http.post("/v1/chat/completions", json=chat(model="m2"))
    # OpenAI's own type for an unknown model; the code says which failure it is.
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert error["code"] == "model_not_found"
    assert "did you mean m1" in error["message"]
    card = await api.http.get("/v1/models/nope")
    assert_openai_error(card, 404, "invalid_request_error")
    assert (await api.http.get("/v1/models/first")).json()["id"] == "m1"


async def test_full_queue_is_429_with_retry_after(api: Api) -> None:
    engine = await api.engine("m1")
    engine.gate = asyncio.Event()
    first = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat()))
    await eventually(lambda: api.runtime.models.get("m1").in_flight == 1)
    refused = await api.http.post("/v1/chat/completions", json=chat())
    error = assert_openai_error(refused, 429, "rate_limit_error")
    assert error["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    engine.gate.set()
    assert (await first).status_code == 200
    assert api.runtime.models.get("m1").in_flight == 0


async def test_failure_mid_stream_sends_an_error_frame_then_done(api: Api) -> None:
    (await api.engine("m1")).enqueue(["par", EngineError("the engine crashed"), "never"])
    response = await api.http.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    frames = sse_frames(response.text)
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["message"] == "the engine crashed"
    assert error["type"] == "server_error"
    assert "never" not in response.text


async def test_failure_before_the_first_token_is_a_status_not_a_stream(api: Api) -> None:
    (await api.engine("m1")).enqueue([EngineError("out of memory")])
    response = await api.http.post("/v1/chat/completions", json=chat(stream=True))
    error = assert_openai_error(response, 503, "server_error")
    assert error["code"] == "model_unavailable"


async def test_a_generation_past_its_timeout_is_504(api: Api) -> None:
    engine = await api.engine("m1")
    engine.gate = asyncio.Event()  # never opens
    api.runtime.models.get("m1").spec.config.timeout_s = 0.05
    response = await api.http.post("/v1/chat/completions", json=chat())
    assert assert_openai_error(response, 504, "server_error")["code"] == "timeout"
    assert engine.closed == 1


async def test_admin_load_and_unload(api: Api) -> None:
    loaded = await api.http.post("/admin/models/m1/load")
    assert loaded.json()["state"] == "loaded"
    unloaded = await api.http.post("/admin/models/m1/unload")
    assert unloaded.json()["state"] == "unloaded"
    missing = await api.http.post("/admin/models/zz/load")
    assert assert_openai_error(missing, 404, "invalid_request_error")["code"] == "model_not_found"
    listed = (await api.http.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["m1", "embedder", "broken"]
    assert listed["data"][0]["state"] == "unloaded"


async def test_a_failing_model_falls_back_and_the_answer_names_who_answered(api: Api) -> None:
    (await api.engine("m1")).enqueue(["from ", "m1"])
    response = await api.http.post("/v1/chat/completions", json=chat(model="broken"))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "m1"
    assert body["choices"][0]["message"]["content"] == "from m1"
    streamed = await api.http.post(
        "/v1/completions", json={"model": "broken", "prompt": "x", "stream": True}
    )
    assert json.loads(sse_frames(streamed.text)[0])["model"] == "m1"
    # When the last fallback refuses too (m1's queue is full), the client gets that refusal.
    (await api.engine("m1")).gate = asyncio.Event()
    held = asyncio.ensure_future(api.http.post("/v1/chat/completions", json=chat()))
    await eventually(lambda: api.runtime.models.get("m1").in_flight == 1)
    refused = await api.http.post("/v1/chat/completions", json=chat(model="broken"))
    assert refused.status_code == 429
    api.plugin.built["m1"].gate.set()  # type: ignore[union-attr]
    await held


async def test_an_embedding_past_its_timeout_is_504(api: Api) -> None:
    engine = await api.engine("embedder")
    engine.gate = asyncio.Event()  # never opens
    api.runtime.models.get("embedder").spec.config.timeout_s = 0.05
    response = await api.http.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
    assert assert_openai_error(response, 504, "server_error")["code"] == "timeout"
