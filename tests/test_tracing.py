"""OpenTelemetry tracing: request -> handler -> generation -> upstream spans with the GenAI
semantic-convention attributes, captured by an in-memory exporter and exported over OTLP/HTTP
to a receiver that decodes the protobuf; trace context continued from the caller and passed to
the upstream; trace ids in log lines; the opentelemetry integration's `create_span` and health;
and the same through a served process, where BentoML's own tracing middleware sits in front."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hooks import hookimpl
from runtime.app import Runtime, to_settings
from runtime.config_schema import LogFormat, LoggingConfig, ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.errors import ConfigError
from runtime.integrations import get_integration_manager
from runtime.integrations.opentelemetry import (
    DEFAULT_OPENTELEMETRYINTEGRATION_CONFIG,
    OpenTelemetryIntegration,
    tracing_settings,
)
from runtime.telemetry.logging import configure_logging
from runtime.telemetry.tracing import SpanStream, Tracing, TracingSettings
from runtime.transports.http import create_app
from runtime.transports.http_tracing import TracingMiddleware
from runtime.types import EngineError
from tests.conftest import TEST_OVERRIDES
from tests.otlp_receiver import OtlpReceiver
from tests.scripted_engine import ScriptedEngine
from tests.served import Served
from tests.test_openai_api import ScriptedEngines, chat, sse_frames
from tests.thread_server import ThreadServer

MakeRuntime = Callable[..., Runtime]
TRACED = "+integrations=opentelemetry"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class FakeUpstream(ThreadServer):
    """An OpenAI-compatible upstream that answers with the prompt and keeps each chat
    request's headers (to see the trace context it was sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[dict[str, str]] = []

    def start(self) -> None:
        routes = [
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]
        self.serve(Starlette(routes=routes), "fake upstream")

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        body = await request.json()
        text = body["messages"][-1]["content"]
        usage = {"prompt_tokens": 4, "completion_tokens": 1}
        if not body.get("stream"):
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            answer = {"model": "echo", "choices": [{**choice, "finish_reason": "stop"}]}
            return JSONResponse({**answer, "usage": usage})
        events: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {"choices": [], "usage": usage},
        ]
        frames = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
        return Response(frames + "data: [DONE]\n\n", media_type="text/event-stream")


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    server.start()
    yield server
    server.stop()


class Traced:
    """A started, traced Runtime with the scripted engine, its app, and its finished spans."""

    def __init__(self, runtime: Runtime, http: httpx.AsyncClient, plugin: ScriptedEngines) -> None:
        self.runtime = runtime
        self.http = http
        self.plugin = plugin
        self.memory = InMemorySpanExporter()
        assert runtime.tracing.provider is not None
        runtime.tracing.provider.add_span_processor(SimpleSpanProcessor(self.memory))

    async def engine(self, model: str) -> ScriptedEngine:
        await self.runtime.models.load(model)
        return self.plugin.built[model]

    def spans(self) -> list[ReadableSpan]:
        return list(self.memory.get_finished_spans())

    def one(self, name: str) -> ReadableSpan:
        found = [span for span in self.spans() if span.name == name]
        assert len(found) == 1, (name, [span.name for span in self.spans()])
        return found[0]


@pytest.fixture
async def traced_factory(make_runtime: MakeRuntime) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def build(*overrides: str, plugins: tuple[object, ...] = ()) -> Traced:
        plugin = ScriptedEngines()
        runtime = make_runtime(TRACED, *overrides, builtins=[plugin, *plugins])
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False),
            base_url="http://tiffin.test",
        )
        clients.append(http)
        traced = Traced(runtime, http, plugin)
        await runtime.start()
        for config in (
            ModelConfig(id="m1", source="x", timeout_s=5),
            ModelConfig(id="embedder", source="x"),
        ):
            runtime.models.register(ModelSpec(config, Path("x"), "scripted"))
        return traced

    yield build
    for http in clients:
        await http.aclose()


@pytest.fixture
async def traced(traced_factory: Callable[..., Any]) -> Traced:
    built: Traced = await traced_factory()
    return built


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# --- spans of a request -------------------------------------------------------------------------


async def test_chat_completion_spans_request_handler_generation(traced: Traced) -> None:
    (await traced.engine("m1")).enqueue(["Hel", "lo"])
    response = await traced.http.post(
        "/v1/chat/completions", json=chat(temperature=0.5, top_p=0.9, max_tokens=20)
    )
    assert response.status_code == 200
    server = traced.one("POST /v1/chat/completions")
    handler = traced.one("handler chat_completions")
    generation = traced.one("chat m1")

    assert server.kind is SpanKind.SERVER and server.parent is None
    assert parent_of(handler) == server.context.span_id
    assert parent_of(generation) == handler.context.span_id
    assert {s.context.trace_id for s in (server, handler, generation)} == {server.context.trace_id}
    assert all(s.status.status_code is StatusCode.UNSET for s in (server, handler, generation))

    assert server.attributes is not None and handler.attributes is not None
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["tiffin.request_id"] == response.headers["x-request-id"]
    assert handler.attributes["tiffin.handler"] == "openai.chat_completions"
    assert generation.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m1",
        "gen_ai.provider.name": "custom_models",
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.max_tokens": 20,
        "tiffin.time_to_first_chunk_s": generation.attributes["tiffin.time_to_first_chunk_s"],
        "gen_ai.response.model": "m1",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 3,
        "gen_ai.usage.output_tokens": 2,
    }
    assert generation.resource.attributes["deployment.environment.name"] == "test"
    assert generation.instrumentation_scope is not None
    assert generation.instrumentation_scope.name == "tiffin"


async def test_a_stream_keeps_its_spans_open_until_it_ends(traced: Traced) -> None:
    (await traced.engine("m1")).enqueue(["a", "b", "c"])
    body = chat(stream=True, stream_options={"include_usage": True})
    response = await traced.http.post("/v1/chat/completions", json=body)
    assert sse_frames(response.text)[-1] == "[DONE]"
    server = traced.one("POST /v1/chat/completions")
    handler = traced.one("handler chat_completions")
    generation = traced.one("chat m1")
    assert parent_of(generation) == handler.context.span_id
    # The handler returned before the first chunk was sent; its span ended with the stream.
    assert generation.end_time is not None and handler.end_time is not None
    assert server.end_time is not None
    assert generation.end_time <= handler.end_time <= server.end_time
    assert generation.attributes is not None
    assert generation.attributes["tiffin.stream"] is True
    assert generation.attributes["gen_ai.usage.output_tokens"] == 3
    assert generation.attributes["gen_ai.response.finish_reasons"] == ("stop",)


async def test_text_completion_and_embeddings_are_their_operations(traced: Traced) -> None:
    await traced.http.post("/v1/completions", json={"model": "m1", "prompt": "hi", "n": 2})
    completion = traced.one("text_completion m1")
    assert completion.attributes is not None
    assert completion.attributes["gen_ai.operation.name"] == "text_completion"
    assert completion.attributes["gen_ai.request.choice.count"] == 2

    await traced.engine("embedder")  # (what it can do is known once it is loaded)
    response = await traced.http.post(
        "/v1/embeddings", json={"model": "embedder", "input": ["ab", "cde"]}
    )
    assert response.status_code == 200
    embedding = traced.one("embeddings embedder")
    assert parent_of(embedding) == traced.one("handler embeddings").context.span_id
    assert embedding.attributes is not None
    assert embedding.attributes["gen_ai.operation.name"] == "embeddings"
    assert embedding.attributes["gen_ai.usage.input_tokens"] == 5
    assert embedding.attributes["gen_ai.embeddings.dimension.count"] == 1


async def test_errors_mark_the_spans_that_failed(traced: Traced) -> None:
    missing = await traced.http.post("/v1/chat/completions", json=chat(model="nope"))
    assert missing.status_code == 404
    handler = traced.one("handler chat_completions")
    assert handler.status.status_code is StatusCode.ERROR
    assert handler.attributes is not None
    assert handler.attributes["error.type"] == "model_not_found"
    server = traced.one("POST /v1/chat/completions")  # a 4xx is the client's error, not ours
    assert server.status.status_code is StatusCode.UNSET
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 404
    traced.memory.clear()

    (await traced.engine("m1")).enqueue(["a", EngineError("the GPU fell off the bus")])
    failed = await traced.http.post("/v1/chat/completions", json=chat())
    assert failed.status_code == 503
    generation = traced.one("chat m1")
    assert generation.status.status_code is StatusCode.ERROR
    assert generation.status.description == "the GPU fell off the bus"
    assert generation.attributes is not None
    assert generation.attributes["error.type"] == "EngineError"
    assert [event.name for event in generation.events] == ["exception"]
    server = traced.one("POST /v1/chat/completions")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None and server.attributes["error.type"] == "503"
    traced.memory.clear()

    (await traced.engine("m1")).enqueue(["a", EngineError("gone mid-stream")])
    streamed = await traced.http.post("/v1/chat/completions", json=chat(stream=True))
    assert streamed.status_code == 200 and "gone mid-stream" in streamed.text
    assert traced.one("chat m1").status.status_code is StatusCode.ERROR
    assert traced.one("handler chat_completions").status.status_code is StatusCode.ERROR
    assert traced.one("POST /v1/chat/completions").status.status_code is StatusCode.UNSET


async def test_a_callers_trace_is_continued_and_its_sampling_decision_kept(traced: Traced) -> None:
    await traced.http.post(
        "/v1/chat/completions", json=chat(), headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}
    )
    server = traced.one("POST /v1/chat/completions")
    assert server.parent is not None and server.parent.is_remote
    assert format(server.context.trace_id, "032x") == TRACE
    assert format(server.parent.span_id, "016x") == PARENT
    traced.memory.clear()

    await traced.http.post(
        "/v1/chat/completions", json=chat(), headers={"traceparent": f"00-{TRACE}-{PARENT}-00"}
    )
    assert traced.spans() == []


async def test_probes_get_no_span(traced: Traced) -> None:
    await traced.http.get("/readyz")
    await traced.http.get("/nowhere")
    assert [span.name for span in traced.spans()] == ["GET"]  # the 404 has no route to name


# --- the integration ----------------------------------------------------------------------------


async def test_create_span_as_the_guide_shows(traced: Traced) -> None:
    manager = await get_integration_manager()
    otel = manager.get_integration("opentelemetry")
    assert isinstance(otel, OpenTelemetryIntegration)
    with otel.create_span("model_inference", {"model": "llama2-7b"}) as span:
        assert span.is_recording()
    with pytest.raises(ValueError, match="bad prompt"):
        with otel.create_span("guard", {"model": "llama2-7b"}):
            raise ValueError("bad prompt")
    inference, guard = traced.one("model_inference"), traced.one("guard")
    assert inference.attributes == {"model": "llama2-7b"}
    assert inference.status.status_code is StatusCode.UNSET
    assert guard.status.status_code is StatusCode.ERROR
    assert guard.attributes is not None and guard.attributes["error.type"] == "ValueError"
    status = (await traced.http.get("/integrations/opentelemetry/status")).json()
    assert status["status"] == "active"
    assert status["tracing"]["enabled"] is True


class GuardAndLog:
    """A plugin whose before_generate opens a span through the integration and logs, the way
    a user's guard plugin would."""

    @hookimpl
    def before_generate(self, request: Any, ctx: Any) -> None:
        otel = ctx.integrations.get_integration("opentelemetry")
        with otel.create_span("prompt_guard", {"gen_ai.request.model": request.model}):
            ctx.log.warning("prompt checked")
            logging.getLogger("tiffin.guard").warning("stdlib line")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    configure_logging(LoggingConfig(level="INFO", format=LogFormat.json), stream=out)
    yield out
    structlog.contextvars.clear_contextvars()
    configure_logging(LoggingConfig(level="WARNING"))


async def test_log_lines_of_a_request_carry_its_trace_and_span_ids(
    traced_factory: Callable[..., Any], log_stream: io.StringIO
) -> None:
    traced: Traced = await traced_factory(plugins=(GuardAndLog(),))
    structlog.get_logger("tiffin.test").warning("outside any request")
    await traced.http.post("/v1/chat/completions", json=chat())
    guard = traced.one("prompt_guard")
    assert parent_of(guard) == traced.one("handler chat_completions").context.span_id
    lines = {line["event"]: line for line in map(json.loads, log_stream.getvalue().splitlines())}
    assert "trace_id" not in lines["outside any request"]
    for event in ("prompt checked", "stdlib line"):
        assert lines[event]["trace_id"] == format(guard.context.trace_id, "032x")
        assert lines[event]["span_id"] == format(guard.context.span_id, "016x")


# --- outgoing calls -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_the_upstream_receives_the_trace_context(
    traced_factory: Callable[..., Any], upstream: FakeUpstream, stream: bool
) -> None:
    traced: Traced = await traced_factory(
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
    )
    upstream.headers.clear()
    response = await traced.http.post(
        "/v1/chat/completions", json=chat(model="openai_compatible/echo", stream=stream)
    )
    assert response.status_code == 200
    generation = traced.one("chat openai_compatible/echo")
    client = traced.one("POST")
    assert client.kind is SpanKind.CLIENT
    assert parent_of(client) == generation.context.span_id
    assert generation.attributes is not None
    assert generation.attributes["gen_ai.provider.name"] == "openai_compatible"
    assert generation.attributes["gen_ai.usage.input_tokens"] == 4
    trace_id = format(client.context.trace_id, "032x")
    [sent] = upstream.headers
    _, sent_trace, sent_parent, flags = sent["traceparent"].split("-")
    assert (sent_trace, sent_parent) == (trace_id, f"{client.context.span_id:016x}")
    assert int(flags, 16) & 1  # sampled
    # The model list read at start (no request around it) started no trace of its own.
    assert {span.context.trace_id for span in traced.spans()} == {client.context.trace_id}


# --- export over OTLP/HTTP ----------------------------------------------------------------------


async def test_spans_are_exported_over_otlp_http(
    traced_factory: Callable[..., Any], receiver: OtlpReceiver
) -> None:
    receiver.spans.clear()
    receiver.exports.clear()
    receiver.reject_spans = False
    traced: Traced = await traced_factory(
        "integrations.opentelemetry.settings.exporters=[otlp_http]",
        f"integrations.opentelemetry.settings.endpoint={receiver.url}",
        "integrations.opentelemetry.settings.service_name=tiffin-test",
        "+integrations.opentelemetry.settings.headers.x_tenant=acme",
    )
    # initialize() checked that the collector answers with an empty export.
    assert receiver.exports and receiver.spans == []
    (await traced.engine("m1")).enqueue(["Hel", "lo"])
    await traced.http.post("/v1/chat/completions", json=chat(max_tokens=7))
    assert await asyncio.to_thread(traced.runtime.tracing.force_flush)

    spans = receiver.wait_for({"POST /v1/chat/completions", "handler chat_completions", "chat m1"})
    by_name = {span.name: span for span in spans}
    server, handler = by_name["POST /v1/chat/completions"], by_name["handler chat_completions"]
    generation = by_name["chat m1"]
    assert server.kind == "SPAN_KIND_SERVER" and server.parent_span_id == ""
    assert handler.parent_span_id == server.span_id
    assert generation.parent_span_id == handler.span_id
    assert generation.trace_id == server.trace_id
    assert generation.attributes["gen_ai.operation.name"] == "chat"
    assert generation.attributes["gen_ai.request.model"] == "m1"
    assert generation.attributes["gen_ai.request.max_tokens"] == 7
    assert generation.attributes["gen_ai.usage.input_tokens"] == 3
    assert generation.attributes["gen_ai.usage.output_tokens"] == 2
    assert generation.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert generation.resource["service.name"] == "tiffin-test"
    assert generation.resource["deployment.environment"] == "test"
    assert generation.scope == "tiffin"
    assert receiver.exports[-1]["x_tenant"] == "acme"

    otel = traced.runtime.integrations.get_integration("opentelemetry")
    health = await otel.health_check()
    assert health.healthy and not health.degraded
    assert "otlp_http: " in health.detail and "0 failed" in health.detail
    assert otel.describe()["settings"]["headers"] == {"x_tenant": "***"}

    receiver.reject_spans = True
    await traced.http.post("/v1/chat/completions", json=chat())
    await asyncio.to_thread(traced.runtime.tracing.force_flush)
    health = await otel.health_check()
    assert health.healthy and health.degraded
    assert "last export to otlp_http failed" in health.detail


async def test_an_unreachable_collector_fails_the_integration_not_the_service(
    make_runtime: MakeRuntime,
) -> None:
    runtime = make_runtime(
        TRACED,
        "integrations.opentelemetry.settings.exporters=[otlp_http]",
        "integrations.opentelemetry.settings.endpoint=http://127.0.0.1:9",
        "integrations.opentelemetry.retry_config.max_retries=0",
    )
    await runtime.start()
    otel = runtime.integrations.get_integration("opentelemetry")
    assert otel.status.value == "error"
    assert "cannot be reached" in (otel.last_error or "")
    assert runtime.ready and runtime.tracing.enabled


# --- configuration ------------------------------------------------------------------------------


def settings_of(compose_test: Callable[..., Any], *overrides: str) -> TracingSettings:
    return tracing_settings(to_settings(compose_test(*overrides)))


async def test_selecting_the_integration_turns_tracing_on(
    compose_test: Callable[..., Any], make_runtime: MakeRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-gateway")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    off = make_runtime()
    assert not off.tracing.enabled and off.tracing.provider is None
    assert make_runtime(TRACED).tracing.enabled

    selected = settings_of(compose_test, TRACED)
    assert selected.enabled
    assert selected.exporter_kinds() == []  # env=test names no exporter
    assert selected.endpoint_of("otlp_http") == "http://collector:4318/v1/traces"
    assert (selected.service_name, selected.sampling_ratio) == ("llm-gateway", 0.25)
    assert selected.environment == "test"

    # Without the integration, telemetry.* and the same variables say the same.
    flag = settings_of(
        compose_test, "telemetry.tracing=true", "telemetry.exporters=[otlp,prometheus]"
    )
    assert flag.enabled and flag.exporter_kinds() == ["otlp_http"]
    assert (flag.endpoint, flag.service_name, flag.sampling_ratio) == (
        selected.endpoint,
        selected.service_name,
        selected.sampling_ratio,
    )


def test_exporter_choices(
    compose_test: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert settings_of(compose_test, "env=dev", TRACED).exporter_kinds() == ["console"]
    grpc = settings_of(
        compose_test, TRACED, "integrations.opentelemetry.settings.protocol=grpc", "env=prod"
    )
    assert grpc.exporter_kinds() == ["otlp_grpc"]
    assert grpc.endpoint_of("otlp_grpc") == "http://localhost:4317"
    with pytest.raises(ConfigError) as error:
        settings_of(compose_test, TRACED, "integrations.opentelemetry.settings.exporters=[zipkin]")
    assert error.value.key == "integrations.opentelemetry.settings.exporters"
    assert "otlp_http" in error.value.expected


def test_opentelemetry_enabled_false_turns_the_integration_off(
    compose_test: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENTELEMETRY_ENABLED", "false")
    assert not settings_of(compose_test, TRACED).enabled


async def test_tracing_off_adds_nothing_to_the_request_path(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(builtins=[ScriptedEngines()])
    assert not runtime.tracing.enabled
    app = create_app(runtime)
    # The middleware stays (an apply may turn tracing on) and only passes requests on.
    assert [m.cls for m in app.user_middleware].count(TracingMiddleware) == 1
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/v1/models")).status_code == 200
    assert runtime.tracing.provider is None and not runtime.tracing.exports
    await runtime.start()
    runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
    event_body = chat(stream=True)
    from runtime.types import Event

    result = await runtime.dispatcher.dispatch("chat_completions", Event(body=event_body))
    assert not isinstance(result, SpanStream)
    await result.aclose()
    assert Tracing.disabled().provider is None


# --- a served process ---------------------------------------------------------------------------


@pytest.mark.slow
def test_served_process_exports_spans_under_bentoml(
    tmp_path: Path, receiver: OtlpReceiver, upstream: FakeUpstream
) -> None:
    """Under `bentoml serve`, BentoML's middleware runs its own (unsampled) server span first;
    Tiffin's trace still starts from the caller's traceparent, or is a root of its own."""
    receiver.spans.clear()
    receiver.reject_spans = False
    upstream.headers.clear()
    served = Served.start(
        tmp_path,
        *TEST_OVERRIDES,
        TRACED,
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
        "integrations.opentelemetry.settings.exporters=[otlp_http]",
        f"integrations.opentelemetry.settings.endpoint={receiver.url}",
        "integrations.opentelemetry.settings.schedule_delay_ms=50",
    )
    try:
        served.wait_for("/readyz", 200)
        body = chat(model="openai_compatible/echo")
        continued = httpx.post(
            served.url + "/v1/chat/completions",
            json=body,
            headers={"traceparent": f"00-{TRACE}-{PARENT}-01"},
            timeout=30,
        )
        assert continued.status_code == 200, continued.text
        assert upstream.headers[-1]["traceparent"].startswith(f"00-{TRACE}-")
        fresh = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=30)
        assert fresh.status_code == 200
    except BaseException:
        served.kill()
        raise
    assert served.stop() == 0  # its shutdown flushed the spans still queued
    spans = list(receiver.spans)
    servers = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert sorted((s.trace_id == TRACE, s.parent_span_id) for s in servers) == [
        (False, ""),
        (True, PARENT),
    ]
    generations = [s for s in spans if s.name == "chat openai_compatible/echo"]
    assert len(generations) == 2
    assert all(g.attributes["gen_ai.usage.output_tokens"] == 1 for g in generations)
    assert {s.resource["service.name"] for s in spans} == {"tiffin"}


def test_the_default_config_names_the_yaml_settings(
    compose_test: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "EXPORTER_OTLP_PROTOCOL",
        "EXPORTER_OTLP_ENDPOINT",
        "SERVICE_NAME",
        "TRACES_SAMPLER_ARG",
    ):
        monkeypatch.delenv(f"OTEL_{name}", raising=False)
    yaml = to_settings(compose_test(TRACED)).integrations["opentelemetry"]
    default = DEFAULT_OPENTELEMETRYINTEGRATION_CONFIG
    assert (yaml._target_, yaml.type, yaml.priority) == (
        default._target_,
        default.type,
        default.priority,
    )
    assert TracingSettings.from_mapping(yaml.settings) == TracingSettings.from_mapping(
        default.settings
    )
    assert set(yaml.settings) == set(default.settings)


# --- gRPC ---------------------------------------------------------------------------------------


async def test_a_grpc_call_is_a_server_span_continuing_the_callers_trace(traced: Traced) -> None:
    import grpc

    from runtime.transports.grpc import GrpcServer
    from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
    from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc

    (await traced.engine("m1")).enqueue(["Hel", "lo"])
    server = GrpcServer(traced.runtime, host="127.0.0.1", port=0)
    port = await server.start()
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{caller_trace}-00f067aa0ba902b7-01"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = pb.ChatRequest(
                model="m1", messages=[pb.ChatMessage(role="user", content="hi")]
            )
            replies = [reply async for reply in stub.Chat(request, metadata=metadata)]
            assert replies
    finally:
        await server.stop(0)
    call = traced.one("tiffin.v1.Inference/Chat")
    assert call.kind.name == "SERVER"
    assert f"{call.context.trace_id:032x}" == caller_trace
    assert call.attributes is not None
    assert call.attributes["rpc.system"] == "grpc"
    assert (call.attributes["rpc.service"], call.attributes["rpc.method"]) == (
        "tiffin.v1.Inference",
        "Chat",
    )
    assert call.attributes["rpc.grpc.status_code"] == 0
    handler = traced.one("handler chat_completions")
    assert parent_of(handler) == call.context.span_id
    assert traced.one("chat m1").context.trace_id == call.context.trace_id
