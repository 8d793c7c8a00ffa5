"""The GraphQL transport: every query, mutation and subscription of the route table on a scripted
engine, the limits, errors in GraphQL's shape, auth through `before_request`, the same handler as
HTTP, and GraphiQL running a query in headless Chromium. Subscriptions speak graphql-transport-ws
with the `websockets` client to uvicorn on a loopback port (httpx's in-process transport has no
WebSockets)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from hooks import hookimpl
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from runtime.types import Event, HandlerError
from tests.chromium import chromium_page
from tests.conftest import TEST_OVERRIDES, eventually, free_port
from tests.scripted_engine import batching
from tests.served import Served as ServedProcess
from tests.test_openai_api import ScriptedEngines, chat

MakeRuntime = Callable[..., Runtime]


class Gql:
    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, plugin: ScriptedEngines) -> None:
        self.runtime = runtime
        self.http = http
        self.plugin = plugin

    async def __call__(
        self, document: str, variables: dict[str, Any] | None = None, **headers: str
    ) -> dict[str, Any]:
        """POST a document; GraphQL answers 200 whatever happened, errors in the body."""
        response = await self.http.post(
            "/graphql", json={"query": document, "variables": variables or {}}, headers=headers
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        return dict(response.json())


async def start(make_runtime: MakeRuntime, *overrides: str, plugins: Sequence[object] = ()) -> Gql:
    engines = ScriptedEngines()
    runtime = make_runtime("integrations=db", *overrides, builtins=[engines, *plugins])
    prices = {"prompt_per_1k": 2.0, "completion_per_1k": 10.0}
    for config in (
        ModelConfig(id="m1", source="x", prices=prices, timeout_s=5),
        ModelConfig(id="broken", source="x"),
    ):
        runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    http = httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")
    return Gql(runtime, http, engines)


@pytest.fixture
async def gql(make_runtime: MakeRuntime) -> AsyncIterator[Gql]:
    api = await start(make_runtime)
    async with api.http:
        yield api


def data(answer: dict[str, Any]) -> dict[str, Any]:
    assert "errors" not in answer, answer["errors"]
    return dict(answer["data"])


def only_error(answer: dict[str, Any]) -> dict[str, Any]:
    """The one error of an answer, checked to be in GraphQL's shape."""
    assert len(answer["errors"]) == 1, answer
    error = answer["errors"][0]
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


# --- queries ------------------------------------------------------------------------------------


async def test_models_query(gql: Gql) -> None:
    answer = await gql("{ models { id name provider status capabilities } }")
    models = {m["id"]: m for m in data(answer)["models"]}
    assert models["m1"] == {
        "id": "m1",
        "name": "m1",
        "provider": "local",
        "status": "unloaded",
        "capabilities": ["chat", "completion"],
    }
    assert set(models) == {"m1", "broken"}


async def test_models_query_shows_a_batching_engines_slots(gql: Gql) -> None:
    await gql.runtime.models.load("m1")
    gql.plugin.built["m1"].extra_stats = batching(slots_busy=5, slots_free=3)
    document = """{
      models { id slotsBusy slotsFree }
      metrics { models { id slotsBusy slotsFree running waiting } }
    }"""
    answer = data(await gql(document))
    models = {m["id"]: m for m in answer["models"]}
    assert models["m1"] == {"id": "m1", "slotsBusy": 5, "slotsFree": 3}
    assert models["broken"] == {"id": "broken", "slotsBusy": None, "slotsFree": None}
    live = {m["id"]: m for m in answer["metrics"]["models"]}
    assert live["m1"] == {"id": "m1", "slotsBusy": 5, "slotsFree": 3, "running": 3, "waiting": 2}
    assert live["broken"]["slotsBusy"] is None and live["broken"]["waiting"] is None


async def test_integrations_query(gql: Gql) -> None:
    answer = data(await gql("{ integrations { name type status required healthy } }"))
    names = {i["name"]: i for i in answer["integrations"]}
    assert names["db"]["status"] == "active" and names["db"]["healthy"] is True


async def test_metrics_and_generation_requests_queries(gql: Gql) -> None:
    await gql('mutation { generateText(model: "m1", prompt: "hi") { id } }')
    answer = data(
        await gql(
            """{
              metrics(window: 60) { requests { total inFlight } tokens { completionTotal }
                                    latencyS { p50 } models { id status requests } }
              generationRequests(limit: 5) {
                id model provider transport promptTokens completionTokens latencyS ttftS
                status cost
              }
            }"""
        )
    )
    metrics = answer["metrics"]
    assert metrics["requests"]["total"] >= 1
    assert metrics["tokens"]["completionTotal"] == 1  # the scripted engine's "ok"
    assert metrics["latencyS"]["p50"] is not None
    assert {m["id"]: m["requests"] for m in metrics["models"]}["m1"] == 1
    (record,) = answer["generationRequests"]
    assert record["model"] == "m1" and record["provider"] == "local"
    assert record["transport"] == "graphql" and record["status"] == 200
    assert (record["promptTokens"], record["completionTokens"]) == (3, 1)
    assert record["cost"] == pytest.approx((3 * 2.0 + 1 * 10.0) / 1000)


# --- mutations ----------------------------------------------------------------------------------


GENERATE = """
mutation Generate($model: String!, $prompt: String!) {
  generateText(model: $model, prompt: $prompt, maxTokens: 8, temperature: 0, stop: ["\\n"]) {
    id text tokens cost finishReason usage { promptTokens completionTokens totalTokens }
  }
}"""


async def test_generate_text_mutation(gql: Gql) -> None:
    await gql.runtime.models.load("m1")
    gql.plugin.built["m1"].enqueue(["Hel", "lo"])
    answer = data(
        await gql(GENERATE, {"model": "m1", "prompt": "Say hello"}, **{"x-request-id": "r1"})
    )
    assert answer["generateText"] == {
        "id": "chatcmpl-r1",
        "text": "Hello",
        "tokens": 2,
        "cost": pytest.approx((3 * 2.0 + 2 * 10.0) / 1000),  # from the model's prices
        "finishReason": "stop",
        "usage": {"promptTokens": 3, "completionTokens": 2, "totalTokens": 5},
    }
    (request,) = gql.plugin.built["m1"].requests
    assert request.messages == [{"role": "user", "content": "Say hello"}]
    assert (request.max_tokens, request.temperature, request.stop) == (8, 0.0, ["\n"])


async def test_generate_text_calls_a_tool(gql: Gql) -> None:
    await gql.runtime.models.load("m1")
    gql.plugin.built["m1"].enqueue(['{"name": "get_weather", "arguments": {"city": "Oslo"}}'])
    query = """
    mutation ($schema: JSON!) {
      generateText(model: "m1", prompt: "Weather?", toolChoice: "get_weather",
                   tools: [{name: "get_weather", parameters: $schema}]) {
        text finishReason toolCalls { id name arguments }
      }
    }"""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    answer = data(await gql(query, {"schema": schema}))["generateText"]
    (call,) = answer["toolCalls"]
    assert call["id"].startswith("call_")
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Oslo"}')
    assert (answer["text"], answer["finishReason"]) == ("", "tool_calls")
    (request,) = gql.plugin.built["m1"].requests
    assert request.json_schema is not None and request.tools is not None


async def test_load_and_unload_model_mutations(gql: Gql) -> None:
    loaded = data(await gql('mutation { loadModel(model: "m1") { id status provider } }'))
    assert loaded["loadModel"] == {"id": "m1", "status": "loaded", "provider": "local"}
    assert gql.plugin.built["m1"].loaded
    unloaded = data(await gql('mutation { unloadModel(model: "m1") { id status } }'))
    assert unloaded["unloadModel"] == {"id": "m1", "status": "unloaded"}
    assert not gql.plugin.built["m1"].loaded


# --- errors, limits, auth -----------------------------------------------------------------------


async def test_handler_errors_are_graphql_errors_with_status_and_code(gql: Gql) -> None:
    answer = await gql(GENERATE, {"model": "nope", "prompt": "hi"})
    assert answer["data"] is None
    error = only_error(answer)
    assert error["path"] == ["generateText"]
    assert error["extensions"] == {
        "code": "model_not_found",
        "status": 404,
        "type": "invalid_request_error",
        "param": "model",
    }
    failed = only_error(await gql('mutation { loadModel(model: "broken") { id } }'))
    assert failed["message"] == "model broken failed to load: the GPU fell off the bus"
    assert failed["extensions"] == {
        "code": "model_unavailable",
        "status": 503,
        "type": "server_error",
    }


async def test_an_unexpected_error_is_a_graphql_error_that_leaks_nothing(
    make_runtime: MakeRuntime,
) -> None:
    class Failing:
        @hookimpl
        def register_handlers(self, register: Callable[..., None]) -> None:
            async def boom(event: Event, ctx: Any) -> None:
                raise RuntimeError("database password=hunter2 rejected")

            register("integrations.status", boom)

    api = await start(make_runtime, plugins=[Failing()])
    async with api.http:
        answer = await api("{ integrations { name } }", **{"x-request-id": "req-9"})
    error = only_error(answer)
    assert error["message"] == "internal server error (request id req-9)"
    assert error["extensions"]["status"] == 500
    assert "hunter2" not in json.dumps(answer)


async def test_too_deep_too_long_and_too_aliased_documents_are_refused(
    make_runtime: MakeRuntime,
) -> None:
    api = await start(
        make_runtime, "graphql.max_depth=1", "graphql.max_aliases=3", "graphql.max_tokens=60"
    )
    async with api.http:
        assert data(await api("{ metrics { cost_total: costTotal } }"))
        deep = only_error(await api("{ metrics { requests { total } } }"))
        assert "exceeds maximum operation depth of 1" in deep["message"]
        aliases = " ".join(f"a{i}: models {{ id }}" for i in range(4))
        assert "aliases" in only_error(await api(f"{{ {aliases} }}"))["message"]
        many = " ".join(["id"] * 80)
        assert "token" in only_error(await api(f"{{ models {{ {many} }} }}"))["message"].lower()
        assert api.plugin.built == {}  # refused before anything ran


class ApiKeys:
    """A `before_request` plugin: the same auth on every transport."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    @hookimpl
    def before_request(self, event: Event, ctx: Any) -> None:
        self.seen.append((event.transport, event.headers.get("authorization")))
        if event.headers.get("authorization") != "Bearer sesame":
            raise HandlerError(
                401,
                "a valid API key is required",
                type="authentication_error",
                code="invalid_api_key",
            )


async def test_auth_is_the_same_as_http(make_runtime: MakeRuntime) -> None:
    keys = ApiKeys()
    api = await start(make_runtime, plugins=[keys])
    async with api.http:
        refused = only_error(await api("{ models { id } }"))
        assert refused["message"] == "a valid API key is required"
        assert refused["extensions"] == {
            "code": "invalid_api_key",
            "status": 401,
            "type": "authentication_error",
        }
        allowed = await api("{ models { id } }", authorization="Bearer sesame")
        assert {m["id"] for m in data(allowed)["models"]} == {"m1", "broken"}
        assert (await api.http.get("/v1/models")).status_code == 401
    assert keys.seen == [("graphql", None), ("graphql", "Bearer sesame"), ("http", None)]


async def test_generate_text_reaches_the_same_handler_as_http(make_runtime: MakeRuntime) -> None:
    class Replacement:
        def __init__(self) -> None:
            self.transports: list[str] = []

        @hookimpl
        def register_handlers(self, register: Callable[..., None]) -> None:
            async def chat_completions(event: Event, ctx: Any) -> dict[str, Any]:
                self.transports.append(event.transport)
                prompt = event.body["messages"][-1]["content"]
                return {
                    "id": "chatcmpl-x",
                    "model": event.body["model"],
                    "choices": [{"message": {"content": prompt.upper()}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }

            register("openai.chat_completions", chat_completions)

    replacement = Replacement()
    api = await start(make_runtime, plugins=[replacement])
    async with api.http:
        over_http = await api.http.post("/v1/chat/completions", json=chat(model="m1"))
        over_graphql = data(await api(GENERATE, {"model": "m1", "prompt": "hi"}))
    assert over_http.json()["choices"][0]["message"]["content"] == "HI"
    assert over_graphql["generateText"]["text"] == "HI"
    assert replacement.transports == ["http", "graphql"]
    assert api.plugin.built == {}  # the built-in handler never ran


# --- the schema follows the route table ---------------------------------------------------------


async def test_a_removed_row_takes_its_field_and_a_new_row_adds_one(
    make_runtime: MakeRuntime,
) -> None:
    api = await start(
        make_runtime,
        "handlers=graphql_extra",
    )
    async with api.http:
        gone = only_error(await api('mutation { unloadModel(model: "m1") { id } }'))
        assert "Cannot query field 'unloadModel'" in gone["message"]
        assert data(await api('mutation { loadModel(model: "m1") { id } }'))
        health = data(await api("{ health }"))["health"]  # no typed mapping: the JSON as is
        assert health["status"] == "healthy" and "db" in health["integrations"]


async def test_graphql_enabled_false_serves_no_graphql(make_runtime: MakeRuntime) -> None:
    api = await start(make_runtime, "transports.graphql=false")
    async with api.http:
        response = await api.http.post("/graphql", json={"query": "{ models { id } }"})
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"


# --- subscriptions over graphql-transport-ws ----------------------------------------------------


@pytest.fixture
async def served(gql: Gql) -> AsyncIterator[str]:
    """The app on a loopback port: uvicorn in this event loop."""
    port = free_port()
    config = uvicorn.Config(
        create_app(gql.runtime), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class Subscription:
    """One graphql-transport-ws connection with one subscription on it."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket

    async def receive(self) -> dict[str, Any]:
        while True:
            message = json.loads(await asyncio.wait_for(self.socket.recv(), 10))
            if message["type"] == "ping":
                await self.socket.send(json.dumps({"type": "pong"}))
                continue
            return dict(message)

    async def next(self) -> dict[str, Any]:
        message = await self.receive()
        assert message["type"] == "next", message
        return dict(message["payload"])


@asynccontextmanager
async def subscribe(url: str, document: str, **headers: str) -> AsyncIterator[Subscription]:
    async with websockets.connect(
        f"ws://{url}/graphql", subprotocols=["graphql-transport-ws"], additional_headers=headers
    ) as socket:
        assert socket.subprotocol == "graphql-transport-ws"
        await socket.send(json.dumps({"type": "connection_init", "payload": {}}))
        subscription = Subscription(socket)
        assert (await subscription.receive())["type"] == "connection_ack"
        await socket.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": document}})
        )
        yield subscription


async def test_model_status_updates_subscription(gql: Gql, served: str) -> None:
    bus = gql.runtime.events
    before = len(bus._subscribers)
    async with subscribe(served, "subscription { modelStatusUpdates { id status } }") as updates:
        await eventually(lambda: len(bus._subscribers) > before)
        loaded = data(await gql('mutation { loadModel(model: "m1") { status } }'))
        assert loaded["loadModel"]["status"] == "loaded"
        assert await updates.next() == {
            "data": {"modelStatusUpdates": {"id": "m1", "status": "loaded"}}
        }
        await gql('mutation { unloadModel(model: "m1") { status } }')
        assert await updates.next() == {
            "data": {"modelStatusUpdates": {"id": "m1", "status": "unloaded"}}
        }
        await updates.socket.send(json.dumps({"id": "1", "type": "complete"}))
        # Completing the subscription closes the handler's stream: it unsubscribes.
        await eventually(lambda: len(bus._subscribers) == before)


async def test_metrics_subscription_streams_snapshots(gql: Gql, served: str) -> None:
    document = "subscription { metrics(interval: 0.1) { time requests { total inFlight } } }"
    async with subscribe(served, document) as snapshots:
        first = (await snapshots.next())["data"]["metrics"]
        second = (await snapshots.next())["data"]["metrics"]
        assert second["time"] > first["time"]
        # The subscription's own request is in flight while it streams.
        assert second["requests"]["inFlight"] >= 1


async def test_subscription_errors_and_auth(make_runtime: MakeRuntime) -> None:
    keys = ApiKeys()
    api = await start(make_runtime, plugins=[keys])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(api.runtime), host="127.0.0.1", port=port, log_level="warning")
    )
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        url = f"127.0.0.1:{port}"
        async with subscribe(url, "subscription { metrics { time } }") as refused:
            refusal = await refused.next()
            assert refusal["data"] is None
            assert refusal["errors"][0]["extensions"]["status"] == 401
            assert (await refused.receive())["type"] == "complete"
        document = "subscription { metrics(interval: 0.1) { time } }"
        async with subscribe(url, document, authorization="Bearer sesame") as allowed:
            assert (await allowed.next())["data"]["metrics"]["time"] > 0
        bad_interval = "subscription { metrics(interval: 0) { time } }"
        async with subscribe(url, bad_interval, authorization="Bearer sesame") as bad:
            invalid = (await bad.next())["errors"][0]
            assert invalid["extensions"]["status"] == 400
            assert invalid["extensions"]["param"] == "interval"
    finally:
        server.should_exit = True
        await task
        await api.http.aclose()


async def test_a_client_that_leaves_stops_its_generation(gql: Gql, served: str) -> None:
    await gql.runtime.models.load("m1")
    engine = gql.plugin.built["m1"]
    engine.gate = asyncio.Event()  # never opened: the generation waits for its first token
    document = {"query": 'mutation { generateText(model: "m1", prompt: "hi") { text } }'}
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"http://{served}/graphql", json=document, timeout=1)
    await eventually(lambda: engine.closed == 1)
    assert not engine.gate.is_set()
    await eventually(lambda: gql.runtime.models.models["m1"].in_flight == 0)


# --- GraphiQL in a real browser -----------------------------------------------------------------


async def test_graphiql_runs_the_models_query_in_headless_chromium(
    gql: Gql, served: str, tmp_path: Path
) -> None:
    page_html = await gql.http.get("/graphql", headers={"accept": "text/html"})
    assert page_html.status_code == 200 and "graphiql.min.js" in page_html.text
    query = "query { models { id provider status } }"
    url = f"http://{served}/graphql?" + str(httpx.QueryParams({"q": query}))
    async with chromium_page(tmp_path, url) as page:
        await page.wait_for("document.querySelector('.graphiql-execute-button') !== null")
        await page.evaluate("document.querySelector('.graphiql-execute-button').click()")
        shown = await page.wait_for(
            "(() => { const r = document.querySelector('.graphiql-response');"
            " const t = r ? r.innerText : ''; return t.includes('provider') ? t : ''; })()"
        )
    assert '"id": "m1"' in shown and '"provider": "local"' in shown
    assert '"id": "broken"' in shown


@pytest.mark.slow
def test_python_m_runtime_serves_graphql(tmp_path: Path) -> None:
    """Under BentoML (`python -m runtime`): queries, GraphiQL and its scripts, subscriptions."""
    served = ServedProcess.start(tmp_path, *TEST_OVERRIDES)
    try:
        served.wait_for("/readyz", 200)
        answer = httpx.post(served.url + "/graphql", json={"query": "{ models { id } }"})
        assert answer.status_code == 200 and answer.json() == {"data": {"models": []}}
        page = httpx.get(served.url + "/graphql", headers={"accept": "text/html"})
        assert page.status_code == 200 and "/graphql/assets/graphiql.min.js" in page.text
        script = httpx.get(served.url + "/graphql/assets/graphiql.min.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith(
            "text/javascript"
        )

        async def watch() -> None:
            address = served.url.removeprefix("http://")
            document = "subscription { metrics(interval: 0.1) { requests { total } } }"
            async with subscribe(address, document) as snapshots:
                assert (await snapshots.next())["data"]["metrics"]["requests"]["total"] >= 1

        asyncio.run(watch())
    finally:
        served.kill()
