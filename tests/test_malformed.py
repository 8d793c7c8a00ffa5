"""A corpus of malformed input for every transport, against one app served by uvicorn on a
loopback port and one gRPC server: each bad input gets the protocol's own error shape (never a
500, a hang or a crash), and the server still answers a good request afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from runtime.app import Runtime
from runtime.transports.grpc import GrpcServer
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from tests.test_ws import Served, assert_error, recv, send, serve, turn

MakeRuntime = Callable[..., Runtime]
LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m1", "messages": HI, **fields}).encode()


def raw_chat(extra: bytes) -> bytes:
    """A chat body with `extra` spliced in verbatim (for what json.dumps will not write)."""
    return b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}], ' + extra + b"}"


def nested(depth: int) -> bytes:
    return b'{"model": "m1", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.fixture
async def served(make_runtime: MakeRuntime) -> AsyncIterator[Served]:
    async with serve(make_runtime, f"server.max_body_bytes={LIMIT}") as served:
        yield served


@pytest.fixture
async def http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.http, timeout=10) as client:
        yield client


async def still_serves(http: httpx.AsyncClient) -> None:
    response = await http.post(CHAT, content=chat())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ok"


def openai_error(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    assert response.status_code == status, f"{what}: {response.status_code} {response.text[:300]}"
    assert response.headers["content-type"] == "application/json", what
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, what
    return dict(error)


# --- HTTP -----------------------------------------------------------------------------------------

# (what, body, expected error code or None for any 400)
BAD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("truncated json", b'{"model": "m1",', "invalid_json"),
    ("empty body", b"", None),
    ("non-utf-8 inside a string", b'{"model": "\xff\xfe", "messages": []}', "invalid_json"),
    ("latin-1 garbage", bytes(range(128, 256)), "invalid_json"),
    ("a json string", b'"hello"', None),
    ("a json array", b"[1, 2, 3]", None),
    ("null", b"null", None),
    ("messages of the wrong type", chat(messages="hi"), None),
    ("a message of the wrong type", chat(messages=[7]), None),
    ("model a number", json.dumps({"model": 7, "messages": HI}).encode(), None),
    ("max_tokens 2**64", chat(max_tokens=2**64), None),
    ("max_tokens 1e309", raw_chat(b'"max_tokens": 1e309'), None),
    ("max_tokens negative", chat(max_tokens=-5), None),
    ("max_tokens a float", chat(max_tokens=1.5), None),
    ("temperature 1e309", raw_chat(b'"temperature": 1e309'), None),
    ("temperature -1e309", raw_chat(b'"temperature": -1e309'), None),
    ("temperature NaN", raw_chat(b'"temperature": NaN'), None),
    ("temperature Infinity", raw_chat(b'"temperature": Infinity'), None),
    ("temperature negative", chat(temperature=-1), None),
    ("temperature a string", chat(temperature="hot"), None),
    ("top_p NaN", raw_chat(b'"top_p": NaN'), None),
    ("seed 2**70", chat(seed=2**70), None),
    ("n huge", chat(n=10**30), None),
    ("a huge integer literal", raw_chat(b'"seed": ' + b"9" * 5000), None),
    ("deeply nested arrays", nested(30_000), "invalid_json"),
    ("nested below the JSON parser's limit", nested(500), None),
    ("stop of the wrong type", chat(stop={"a": 1}), None),
]


async def test_http_bad_bodies_get_openai_errors_and_the_server_keeps_serving(
    http: httpx.AsyncClient,
) -> None:
    for what, body, code in BAD_BODIES:
        response = await http.post(CHAT, content=body, headers={"content-type": "application/json"})
        error = openai_error(response, 400, what)
        assert error["type"] == "invalid_request_error", what
        if code is not None:
            assert error["code"] == code, what
    await still_serves(http)


async def test_http_unknown_fields_are_ignored_as_openai_compatible_servers_do(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post(CHAT, content=chat(frobnicate={"x": 1}, logit_bias={"1": 2}))
    assert response.status_code == 200, response.text


async def test_http_oversized_bodies_are_413_whether_declared_or_streamed(
    http: httpx.AsyncClient,
) -> None:
    big = chat(padding="x" * (LIMIT + 1))
    error = openai_error(await http.post(CHAT, content=big), 413, "declared")
    assert error["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: counted as it arrives
        for _ in range(LIMIT // 1024 + 2):
            yield b" " * 1024

    openai_error(await http.post(CHAT, content=chunks()), 413, "chunked")
    await still_serves(http)


async def test_http_other_routes_refuse_garbage_in_their_own_shape(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/v1/completions", "/v1/embeddings", "/admin/models/pull"):
        for body in (b"\xff\x00", b"[]", b'{"model": 5}', nested(30_000)):
            response = await http.post(path, content=body)
            openai_error(response, 400, f"{path} {body[:10]!r}")
    # The Ollama-compatible routes answer their handlers' errors in Ollama's shape,
    # {"error": "..."}; a body that is not JSON at all is refused before any handler runs.
    for body in (b"\xff\x00", b'{"model": 5}', b'{"model": "m1", "messages": "x"}'):
        response = await http.post("/api/chat", content=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]
    assert isinstance((await http.post("/api/chat", content=b'{"model": 5}')).json()["error"], str)
    await still_serves(http)


# --- GraphQL --------------------------------------------------------------------------------------


async def test_graphql_bad_documents_get_graphql_errors_never_500(
    http: httpx.AsyncClient,
) -> None:
    depth = "{ models { " * 40 + "id" + " }" * 80
    cases: list[Any] = [
        {"query": "{ models { id "},  # syntax error
        {"query": "{ nosuchfield }"},
        {"query": "{ models { nosuchfield } }"},
        {"query": "mutation($m: String!) { loadModel(model: $m) { id } }", "variables": {"m": 5}},
        {"query": "query($x: Int!) { models { id } }", "variables": {"x": "one"}},
        {"query": depth},
        {"query": "{ " + "models { id } " * 3000 + "}"},  # too many tokens
        {"query": "{ " + " ".join(f"a{i}: models {{ id }}" for i in range(100)) + " }"},
        {"query": 5},
        {"query": "{ models { id } }", "variables": "not an object"},
    ]
    for case in cases:
        response = await http.post("/graphql", json=case)
        assert response.status_code in (200, 400), (case, response.status_code, response.text)
        assert response.headers["content-type"] == "application/json", (case, response.text)
        body = response.json()
        assert body.get("errors") and all("message" in e for e in body["errors"]), (case, body)
    for raw in (b"{not json", b"\xff\xfe", nested(30_000), b""):
        response = await http.post(
            "/graphql", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (raw[:10], response.status_code, response.text)
    answer = await http.post("/graphql", json={"query": "{ models { id } }"})
    assert answer.json()["data"]["models"][0]["id"] == "m1"
    await still_serves(http)


# --- WebSocket ------------------------------------------------------------------------------------


async def test_websocket_garbage_frames_get_error_frames_and_the_socket_stays_open(
    served: Served,
) -> None:
    async with served.connect() as ws:
        for frame in [
            "",
            "\x00\x01",
            "{" * 100_000,
            '{"message": "hi", "model": "m1", "temperature": NaN}',
            '{"message": "hi", "model": "m1", "max_tokens": 1e309}',
            b"\xff\xfe\xfd",
            b"",
            json.dumps({"message": "x" * 1000, "model": 7}),
        ]:
            await send(ws, frame)
            frames = [await recv(ws)]
            while frames[-1]["type"] not in ("error", "done"):
                frames.append(await recv(ws))
            assert_error(frames[-1], "invalid_request_error")
        await send(ws, {"message": "still here?", "model": "m1"})
        assert (await turn(ws))[-1]["message"] == "ok"


async def test_websocket_frames_over_the_body_limit_are_refused_and_the_socket_serves_on(
    served: Served,
) -> None:
    async with served.connect(max_size=None) as ws:
        await send(ws, json.dumps({"message": "x" * (LIMIT * 4), "model": "m1"}))
        assert_error(await recv(ws), "invalid_request_error", "request_too_large")
        await send(ws, b"\x00" * (LIMIT * 2))
        assert_error(await recv(ws), "invalid_request_error")
        await send(ws, {"message": "hi", "model": "m1"})
        assert (await turn(ws))[-1]["message"] == "ok"


async def test_websocket_frames_sent_as_the_socket_closes_are_harmless(served: Served) -> None:
    for _ in range(5):
        async with served.connect() as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            await send(ws, "garbage")
            await ws.close()
            with pytest.raises(ConnectionClosed):
                await send(ws, {"message": "after close", "model": "m1"})
    async with served.connect() as ws:
        await send(ws, {"message": "hi", "model": "m1"})
        assert (await turn(ws))[-1]["message"] == "ok"


# --- gRPC -----------------------------------------------------------------------------------------


async def test_grpc_truncated_and_garbage_messages_are_refused_and_the_server_keeps_serving(
    served: Served,
) -> None:
    server = GrpcServer(served.runtime, host="127.0.0.1", port=0, health_interval_s=0.05)
    port = await server.start()
    good = pb.ChatRequest(model="m1", messages=[pb.ChatMessage(role="user", content="hi")])
    encoded = good.SerializeToString()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_stream(
                "/tiffin.v1.Inference/Chat",
                request_serializer=None,
                response_deserializer=None,
            )
            for payload in (
                encoded[: len(encoded) // 2],
                b"\xff" * 64,
                b"\x0a\xff\xff\xff\xff\x0f",  # a length far beyond the message
                bytes(range(256)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in raw(payload, timeout=5):
                        pass
                code = raised.value.code()
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), code
            # Well-formed protobuf with bad values is the handler's to refuse.
            bad = pb.ChatRequest(model="m1", messages=[], temperature=float("nan"))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in raw(bad.SerializeToString(), timeout=5):
                    pass
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            chunks = [c async for c in raw(encoded, timeout=5)]
            assert chunks
    finally:
        await server.stop(0)
    await asyncio.sleep(0)


async def test_graphql_subscription_socket_garbage_closes_that_socket_only(
    served: Served, http: httpx.AsyncClient
) -> None:
    for garbage in ("not json", "{" * 30_000, '{"type": "subscribe"}', b"\xff\xfe"):
        async with served.connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
            await send(ws, {"type": "connection_init"})
            assert (await recv(ws))["type"] == "connection_ack"
            await send(ws, garbage)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and 4400 <= closed.value.rcvd.code < 4500
    answer = await http.post("/graphql", json={"query": "{ models { id } }"})
    assert answer.json()["data"]["models"][0]["id"] == "m1"
