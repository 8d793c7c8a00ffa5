"""The gRPC transport in-process (grpc.aio on a free loopback port, scripted engine): message
framing, each status code, deadlines and cancellation reaching the engine, reflection, health,
and the generated code matching the .proto files. The real model over gRPC against a served
`python -m runtime` is in test_grpc_served.py."""

from __future__ import annotations

import asyncio
import filecmp
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from hooks import hookimpl
from runtime.app import Runtime
from runtime.cli import protoc
from runtime.config_schema import ModelConfig
from runtime.dispatch import Context
from runtime.engines.engine import ModelSpec
from runtime.errors import ConfigError
from runtime.transports.grpc import GrpcServer
from runtime.transports.proto.tiffin.v1 import (
    inference_pb2 as pb,
)
from runtime.transports.proto.tiffin.v1 import (
    inference_pb2_grpc,
    integrations_pb2,
    integrations_pb2_grpc,
)
from runtime.types import EngineError, Event, HandlerError
from tests.conftest import eventually
from tests.scripted_engine import ScriptedEngine
from tests.test_openai_api import ScriptedEngines

MakeRuntime = Callable[..., Runtime]


class FailOnDemand:
    """`before_request` that answers with the HandlerError status named in `x-fail` metadata,
    and records what each gRPC request looked like to the handlers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.remaining: list[float | None] = []

    @hookimpl
    def before_request(self, event: Event, ctx: Context) -> None:
        self.events.append(event)
        self.remaining.append(ctx.remaining)
        status = event.headers.get("x-fail")
        if status == "crash":
            raise RuntimeError("upstream http://admin:hunter2@db failed")
        if status:
            raise HandlerError(int(status), f"refused with {status}")


class Grpc:
    def __init__(
        self, runtime: Runtime, channel: grpc.aio.Channel, plugin: ScriptedEngines
    ) -> None:
        self.runtime = runtime
        self.channel = channel
        self.plugin = plugin
        self.inference = inference_pb2_grpc.InferenceStub(channel)
        self.integrations = integrations_pb2_grpc.IntegrationsStub(channel)

    async def engine(self, model: str) -> ScriptedEngine:
        await self.runtime.models.load(model)
        return self.plugin.built[model]


async def serve(runtime: Runtime) -> tuple[GrpcServer, grpc.aio.Channel]:
    server = GrpcServer(runtime, host="127.0.0.1", port=0, health_interval_s=0.05)
    port = await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture
def recorder() -> FailOnDemand:
    return FailOnDemand()


@pytest.fixture
async def api(make_runtime: MakeRuntime, recorder: FailOnDemand) -> AsyncIterator[Grpc]:
    plugin = ScriptedEngines()
    runtime = make_runtime("transports.grpc=true", builtins=[plugin, recorder])
    await runtime.start()
    for config in (
        ModelConfig(id="m1", source="x", aliases=["first"], max_queue=0, timeout_s=5),
        ModelConfig(id="embedder", source="x"),
    ):
        runtime.models.register(ModelSpec(config, Path("x"), "scripted"))
    server, channel = await serve(runtime)
    try:
        yield Grpc(runtime, channel, plugin)
    finally:
        await channel.close()
        await server.stop(0)


def chat(**fields: Any) -> pb.ChatRequest:
    fields.setdefault("model", "m1")
    return pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], **fields)


async def test_chat_streams_one_message_per_chunk_then_a_final_one(
    api: Grpc, recorder: FailOnDemand
) -> None:
    (await api.engine("m1")).enqueue(["Hel", "lo", "!"])
    call = api.inference.Chat(
        chat(model="first", temperature=0, seed=7, stop=["END"], max_tokens=5),
        metadata=(("authorization", "Bearer sk-test"), ("x-request-id", "req-1")),
    )
    messages = [m async for m in call]
    assert [m.content for m in messages] == ["Hel", "lo", "!", ""]
    assert [m.role for m in messages] == ["assistant", "", "", ""]
    assert {m.id for m in messages} == {"chatcmpl-req-1"}
    assert {m.model for m in messages} == {"m1"}
    assert [m.finish_reason for m in messages] == ["", "", "", "stop"]
    assert not any(m.HasField("usage") for m in messages[:-1])
    usage = messages[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 3, 6)
    assert await call.code() == grpc.StatusCode.OK
    assert ("x-request-id", "req-1") in tuple(await call.trailing_metadata())
    # What the handler got: OpenAI's JSON body, the metadata as headers.
    [event] = recorder.events
    assert event.transport == "grpc"
    assert event.route == "chat_completions"
    assert event.headers["authorization"] == "Bearer sk-test"
    assert event.body == {
        "model": "first",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "temperature": 0.0,
        "seed": 7,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = api.plugin.built["m1"].requests[0]
    assert (request.temperature, request.seed, request.stop) == (0.0, 7, ["END"])


async def test_complete_streams_text_chunks(api: Grpc) -> None:
    (await api.engine("m1")).enqueue(["a", "b"])
    messages = [m async for m in api.inference.Complete(pb.CompleteRequest(model="m1", prompt="x"))]
    assert [(m.text, m.finish_reason) for m in messages] == [("a", ""), ("b", ""), ("", "stop")]
    assert messages[-1].usage.total_tokens == 5


async def test_unary_methods(api: Grpc) -> None:
    models = await api.inference.ListModels(pb.ListModelsRequest())
    assert {m.id for m in models.data} == {"m1", "embedder"}
    assert next(m for m in models.data if m.id == "m1").aliases == ["first"]
    await api.engine("embedder")  # its capabilities are known once loaded
    embedded = await api.inference.Embed(pb.EmbedRequest(model="embedder", input=["ab", "c"]))
    assert [list(e.embedding) for e in embedded.data] == [[2.0], [1.0]]
    assert embedded.usage.prompt_tokens == 3
    status = await api.integrations.Status(integrations_pb2.StatusRequest())
    assert status.ready is True
    assert set(status.integrations) == set(api.runtime.integrations.integrations)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (499, grpc.StatusCode.CANCELLED),
        (502, grpc.StatusCode.UNAVAILABLE),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, grpc.StatusCode.INTERNAL),
    ],
)
async def test_handler_errors_map_to_status_codes(
    api: Grpc, status: int, code: grpc.StatusCode
) -> None:
    metadata = (("x-fail", str(status)),)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await api.inference.ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert unary.value.code() == code
    assert unary.value.details() == f"refused with {status}"
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [m async for m in api.inference.Chat(chat(), metadata=metadata)]
    assert streamed.value.code() == code


async def test_an_unexpected_failure_is_internal_and_keeps_its_secrets(api: Grpc) -> None:
    metadata = (("x-fail", "crash"), ("x-request-id", "req-crash"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await api.inference.ListModels(pb.ListModelsRequest(), metadata=metadata)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "internal server error (request id req-crash)"
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [m async for m in api.inference.Chat(chat(), metadata=metadata)]
    assert streamed.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (streamed.value.details() or "")


async def test_an_engine_failing_mid_stream_ends_the_call_with_an_error(api: Grpc) -> None:
    (await api.engine("m1")).enqueue(["a", EngineError("the GPU fell off the bus")])
    call = api.inference.Chat(chat())
    assert (await call.read()).content == "a"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call.read()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the model's 503
    assert "fell off the bus" in (failed.value.details() or "")


async def test_invalid_requests_and_unknown_models(api: Grpc) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        [m async for m in api.inference.Chat(pb.ChatRequest(model="m1"))]  # no messages
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in (invalid.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        [m async for m in api.inference.Chat(chat(model="nope"))]
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in (unknown.value.details() or "")


async def test_a_message_that_does_not_decode_is_counted_as_a_400(api: Grpc) -> None:
    raw = api.channel.unary_stream(
        "/tiffin.v1.Inference/Chat", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        [m async for m in raw(b"\xff" * 64)]
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    body, _ = api.runtime.metrics.exposition()
    counted = (
        'llm_errors_total{endpoint="chat_completions",model="",provider="",status="400",'
        'transport="grpc",type="invalid_request_error"} 1.0'
    )
    assert counted in body.decode()


async def test_the_client_deadline_stops_the_generation(api: Grpc, recorder: FailOnDemand) -> None:
    engine = await api.engine("m1")
    engine.enqueue(["a", "b"])
    engine.gate = asyncio.Event()  # never opens: the generation waits for ever
    with pytest.raises(grpc.aio.AioRpcError) as late:
        [m async for m in api.inference.Chat(chat(), timeout=0.3)]
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    [remaining] = recorder.remaining  # the request's deadline is the client's
    assert remaining is not None and 0 < remaining <= 0.3
    await eventually(lambda: engine.closed == 1)


async def test_cancelling_the_call_mid_stream_frees_the_engine(api: Grpc) -> None:
    engine = await api.engine("m1")
    engine.enqueue(["a", "b", "c"])
    engine.gate = asyncio.Event()
    engine.gate.set()
    call = api.inference.Chat(chat())
    first = await call.read()
    assert first.content == "a"
    engine.gate.clear()  # hold the rest
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED
    await eventually(lambda: engine.closed == 1)


async def test_reflection_lists_the_services(api: Grpc) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in response.list_services_response.service}
    assert {
        "tiffin.v1.Inference",
        "tiffin.v1.Integrations",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    lookup = reflection_pb2.ServerReflectionRequest(file_containing_symbol="tiffin.v1.Inference")
    [found] = [r async for r in stub.ServerReflectionInfo(iter([lookup]))]
    assert found.file_descriptor_response.file_descriptor_proto


async def test_health_follows_readiness(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("transports.grpc=true")
    server, channel = await serve(runtime)  # not started yet: not ready
    health = health_pb2_grpc.HealthStub(channel)
    try:
        for service in ("", "tiffin.v1.Inference"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await runtime.start()
        assert runtime.ready
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        await runtime.stop()
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await channel.close()
        await server.stop(0)


async def test_health_stays_serving_when_a_preloaded_model_idles_out(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime("transports.grpc=true", builtins=[ScriptedEngines()])
    config = ModelConfig(id="m1", source="x", preload=True, idle_unload_s=0.1)
    runtime.models.register(ModelSpec(config, Path("x"), "scripted"))
    await runtime.start()
    server, channel = await serve(runtime)
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="tiffin.v1.Inference")
    try:
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        await eventually(lambda: runtime.models.get("m1").engine is None)
        # Unloaded for idleness, it loads again on the next request: still able to serve.
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(request)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    finally:
        await channel.close()
        await server.stop(0)


async def test_workers_share_the_port(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("transports.grpc=true")
    first = GrpcServer(runtime, host="127.0.0.1", port=0)
    port = await first.start()
    second = GrpcServer(runtime, host="127.0.0.1", port=port)
    try:
        assert await second.start() == port  # SO_REUSEPORT
    finally:
        await second.stop(0)
        await first.stop(0)


class ReplacementChat:
    """A plugin replacing the chat handler by name: every transport reaches the replacement."""

    def __init__(self) -> None:
        self.transports: list[str] = []

    @hookimpl
    def register_handlers(self, register: Callable[..., None]) -> None:
        register("openai.chat_completions", self.chat)

    async def chat(self, event: Event, ctx: Context) -> dict[str, Any]:
        self.transports.append(event.transport)
        return {
            "id": "chatcmpl-replaced",
            "model": "replacement",
            "choices": [{"index": 0, "message": {"content": "replaced"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


async def test_grpc_and_http_reach_the_same_handler(make_runtime: MakeRuntime) -> None:
    import httpx

    from runtime.transports.http import create_app

    plugin = ReplacementChat()
    runtime = make_runtime("transports.grpc=true", builtins=[plugin])
    await runtime.start()
    server, channel = await serve(runtime)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        messages = [m async for m in stub.Chat(chat())]
        assert [(m.content, m.finish_reason) for m in messages] == [
            ("replaced", ""),
            ("", "stop"),
        ]
        assert messages[-1].usage.total_tokens == 2
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.post("/v1/chat/completions", json={"model": "m1"})
        assert response.json()["choices"][0]["message"]["content"] == "replaced"
        assert plugin.transports == ["grpc", "http"]
    finally:
        await channel.close()
        await server.stop(0)


def test_a_route_to_an_unknown_method_is_refused(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime("handlers.routes.models_list.grpc.method=tiffin.v1.Inference/Nope")
    with pytest.raises(ConfigError, match=r"handlers.routes.models_list.grpc.method"):
        GrpcServer(runtime)


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    written = protoc.generate(tmp_path)
    assert written, "no .proto files found"
    checked_in = protoc.generated_files(protoc.PROTO_ROOT)
    names = [str(p.relative_to(tmp_path)) for p in written]
    assert names == [str(p.relative_to(protoc.PROTO_ROOT)) for p in checked_in]
    stale = [
        name
        for name, fresh, current in zip(names, written, checked_in, strict=True)
        if not current.is_file() or not filecmp.cmp(fresh, current, shallow=False)
    ]
    assert not stale, f"stale generated code (run python -m runtime.cli.protoc): {stale}"
