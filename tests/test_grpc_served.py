"""gRPC against a served `python -m runtime` with the default models: a client built from the
generated stubs streams a chat and gets the same text as the HTTP API (temperature 0, same
seed), and the health service answers SERVING once /readyz does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.transports.proto.tiffin.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import ROOT, free_port
from tests.served import Served, serving_default_models

pytestmark = pytest.mark.slow

CHAT_MODEL = "gemma-3-270m"
QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, int]]:
    port = free_port()
    workdir: Path = tmp_path_factory.mktemp("served-grpc")
    with serving_default_models(
        workdir, "transports.grpc=true", f"server.grpc_port={port}"
    ) as served:
        yield served, port


def test_a_streamed_grpc_chat_matches_the_http_api(served: tuple[Served, int]) -> None:
    server, port = served
    http = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 16,
            "temperature": 0,
            "seed": 42,
        },
        timeout=120,
    ).json()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ChatRequest(
            model=CHAT_MODEL,
            messages=[inference_pb2.ChatMessage(role="user", content=QUESTION)],
            max_tokens=16,
            temperature=0,
            seed=42,
        )
        messages = list(stub.Chat(request, timeout=120))
    text = "".join(m.content for m in messages)
    assert text
    assert text == http["choices"][0]["message"]["content"]
    final = messages[-1]
    assert final.finish_reason == http["choices"][0]["finish_reason"]
    assert final.usage.completion_tokens == http["usage"]["completion_tokens"]
    assert len(messages) > 2  # streamed: one message per token chunk


def test_the_docs_example_runs(
    served: tuple[Served, int], capsys: pytest.CaptureFixture[str]
) -> None:
    _, port = served
    blocks = (ROOT / "docs" / "api" / "grpc.md").read_text().split("```python\n")[1:]
    [example] = [b.split("```", 1)[0] for b in blocks if "inference_pb2_grpc" in b]
    exec(example.replace("127.0.0.1:50051", f"127.0.0.1:{port}"), {})
    assert capsys.readouterr().out.strip()


def test_a_grpc_chat_calls_a_tool(served: tuple[Served, int]) -> None:
    """Tools over gRPC: a `Struct` schema in, the call's pieces out (name first, then the
    arguments' JSON text), the same calls as the HTTP API makes for the same request."""
    from google.protobuf import struct_pb2

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    }
    parameters = struct_pb2.Struct()
    parameters.update(schema)
    server, port = served
    question = "What is the weather in Paris?"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.ChatRequest(
            model=CHAT_MODEL,
            messages=[inference_pb2.ChatMessage(role="user", content=question)],
            max_tokens=100,
            temperature=0,
            tools=[
                inference_pb2.Tool(
                    type="function",
                    function=inference_pb2.FunctionDefinition(
                        name="get_weather", parameters=parameters
                    ),
                )
            ],
            tool_choice=inference_pb2.ToolChoice(
                type="function", function=inference_pb2.FunctionName(name="get_weather")
            ),
        )
        messages = list(stub.Chat(request, timeout=120))
    pieces = [call for m in messages for call in m.tool_calls]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments for p in pieces)
    assert messages[-1].finish_reason == "tool_calls"
    http = httpx.post(
        server.url + "/v1/chat/completions",
        json={
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 100,
            "temperature": 0,
            "tools": [
                {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
            ],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        },
        timeout=120,
    ).json()
    assert arguments == http["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
