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


# --- invalid Unicode, non-finite numbers, bad Ollama options, huge names (issue 14) --------------

LONE = b'"\\ud800"'  # a lone surrogate escape: valid JSON syntax, not valid Unicode text
EMOJI = b'"\\ud83d\\ude00"'  # an escaped surrogate *pair*: one valid character


def spliced(template: bytes, value: bytes = LONE) -> bytes:
    return template.replace(b"@", value)


# (route, body with `@` where the surrogate goes, the param the error names)
SURROGATES: list[tuple[str, bytes, str]] = [
    (CHAT, b'{"model": "m1", "messages": [{"role": "user", "content": @}]}', "messages.0.content"),
    (
        CHAT,
        b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stop": [@]}',
        "stop.0",
    ),
    (CHAT, b'{"model": @, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (CHAT, b'{"model": "m1", "messages": [], @: 1}', ""),  # in a key
    ("/v1/completions", b'{"model": "m1", "prompt": @}', "prompt"),
    ("/v1/completions", b'{"model": "m1", "prompt": "hi", "stop": @}', "stop"),
    ("/v1/embeddings", b'{"model": "m1", "input": ["ok", @]}', "input.1"),
    ("/api/chat", b'{"model": "m1", "messages": [{"role": "user", "content": @}]}', ""),
    ("/api/generate", b'{"model": "m1", "prompt": @}', ""),
    ("/api/generate", b'{"model": "m1", "prompt": "hi", "options": {"stop": [@]}}', ""),
    ("/api/embed", b'{"model": "m1", "input": @}', ""),
]


async def test_http_lone_surrogates_are_400_on_every_route_in_its_shape(
    served: Served, http: httpx.AsyncClient
) -> None:
    for path, template, param in SURROGATES:
        what = f"{path} {template.decode()}"
        response = await http.post(path, content=spliced(template))
        if path.startswith("/api/"):
            assert response.status_code == 400, (what, response.text)
            assert set(response.json()) == {"error"}, what
            assert "surrogate" in response.json()["error"], what
            continue
        error = openai_error(response, 400, what)
        assert error["code"] == "invalid_json", what
        assert "\\ud800" in error["message"], what
        if param:
            assert error["param"] == param, what
    # The same places with an escaped pair (an emoji) are fine.
    for path, body in [
        (CHAT, spliced(SURROGATES[0][1], EMOJI)),
        ("/v1/completions", spliced(SURROGATES[4][1], EMOJI)),
        ("/api/generate", b'{"model": "m1", "stream": false, "prompt": ' + EMOJI + b"}"),
    ]:
        response = await http.post(path, content=body)
        assert response.status_code == 200, (path, response.text)
    assert (await served.engine()).requests[0].messages == [
        {"role": "user", "content": "\U0001f600"}
    ]
    await still_serves(http)


# Every numeric sampling field of the OpenAI API, each refused when not finite.
OPENAI_NUMBERS = [
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "max_completion_tokens", "n", "top_logprobs",
]  # fmt: skip


async def test_http_non_finite_numbers_are_refused_for_every_sampling_field(
    http: httpx.AsyncClient,
) -> None:
    for name in OPENAI_NUMBERS:
        for literal in (b"1e400", b"-1e400", b"NaN", b"Infinity"):
            body = raw_chat(b'"' + name.encode() + b'": ' + literal)
            error = openai_error(await http.post(CHAT, content=body), 400, f"{name} {literal!r}")
            assert error["param"] == name, (name, literal, error)
    # Anywhere in the body, even in a field that is otherwise ignored.
    error = openai_error(await http.post(CHAT, content=raw_chat(b'"x": [1e400]')), 400, "x")
    assert error["param"] == "x.0"
    await still_serves(http)


# (options, the option the error names); each sent to /api/chat and /api/generate
BAD_OPTIONS: list[tuple[dict[str, Any] | bytes, str]] = [
    *[({name: "hot"}, name) for name in ("temperature", "top_p", "min_p", "repeat_penalty")],
    *[({name: "x"}, name) for name in ("presence_penalty", "frequency_penalty", "seed")],
    *[({name: 1.5}, name) for name in ("top_k", "num_predict", "num_ctx", "seed")],
    *[({name: [1]}, name) for name in ("temperature", "top_k", "num_ctx")],
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2**40}, "top_k"),
    ({"num_predict": 0}, "num_predict"),
    ({"num_ctx": 0}, "num_ctx"),
    ({"seed": 2**70}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    *[(b'{"' + n.encode() + b'": 1e400}', n) for n in ("temperature", "seed", "num_predict")],
    (b'{"repeat_penalty": 1e400}', "repeat_penalty"),
    (b'{"num_ctx": NaN}', "num_ctx"),
    (b'{"mirostat_tau": 1e400}', "mirostat_tau"),  # unknown, but not finite
]


async def test_ollama_bad_options_are_400_in_ollamas_shape_naming_the_option(
    http: httpx.AsyncClient,
) -> None:
    for options, name in BAD_OPTIONS:
        raw = options if isinstance(options, bytes) else json.dumps(options).encode()
        for path, rest in (
            ("/api/chat", b'"messages": [{"role": "user", "content": "hi"}]'),
            ("/api/generate", b'"prompt": "hi"'),
        ):
            body = b'{"model": "m1", "stream": false, ' + rest + b', "options": ' + raw + b"}"
            response = await http.post(path, content=body)
            what = f"{path} {raw!r}"
            assert response.status_code == 400, (what, response.text)
            assert set(response.json()) == {"error"}, (what, response.text)
            assert name in response.json()["error"], (what, response.text)
    # Unknown options are ignored (as Ollama does); Ollama's -1 means "until the context is full".
    good = {"mirostat": 2, "num_thread": 4, "num_predict": -1, "stop": "\n", "seed": 7}
    body = {"model": "m1", "stream": False, "prompt": "hi", "options": good}
    response = await http.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "ok"
    await still_serves(http)


NON_OBJECTS = [b"1", b'"x"', b"null", b"true", b"NaN", b"1e999", b"[]", b"[1]", b"[null]"]


async def test_graphql_bodies_that_are_not_objects_and_invalid_unicode_are_400_errors(
    http: httpx.AsyncClient,
) -> None:
    for raw in NON_OBJECTS:
        response = await http.post(
            "/graphql", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (raw, response.status_code, response.text)
        assert response.json()["errors"][0]["message"], raw
    generate = json.dumps(
        "mutation($p: String!, $s: [String!]) "
        '{ generateText(model: "m1", prompt: $p, stop: $s) { text } }'
    ).encode()
    for variables in (b'{"p": @}', b'{"p": "hi", "s": [@]}'):
        body = b'{"query": ' + generate + b', "variables": ' + spliced(variables) + b"}"
        response = await http.post(
            "/graphql", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (variables, response.text)
        assert "\\ud800" in response.json()["errors"][0]["message"]
    # An escape inside a GraphQL string literal: graphql-core refuses a lone one, joins a pair.
    literal = 'mutation { generateText(model: "m1", prompt: "%s") { text } }'
    refused = await http.post("/graphql", json={"query": literal % "\\ud800"})
    assert refused.json()["errors"][0]["message"].startswith("Syntax Error"), refused.text
    answered = await http.post("/graphql", json={"query": literal % "\\ud83d\\ude00"})
    assert answered.json() == {"data": {"generateText": {"text": "ok"}}}, answered.text
    await still_serves(http)


async def test_websocket_invalid_unicode_and_non_finite_numbers_get_error_frames(
    served: Served,
) -> None:
    async with served.connect() as ws:
        for frame in (
            '{"message": "\\ud800", "model": "m1"}',
            '{"messages": [{"role": "user", "content": "\\udfff"}], "model": "m1"}',
            '{"message": "hi", "model": "m1", "stop": ["\\ud800"]}',
            '{"message": "hi", "model": "m1", "repeat_penalty": 1e400}',
        ):
            await send(ws, frame)
            error = assert_error(await recv(ws), "invalid_request_error", "invalid_json")
            assert error["param"], frame
        await send(ws, '{"message": "\\ud83d\\ude00", "model": "m1"}')
        assert (await turn(ws))[-1]["message"] == "ok"


async def test_graphql_subscription_socket_non_object_messages_close_it_with_4400(
    served: Served,
) -> None:
    for garbage in (
        "1", '"x"', "null", "[]", "NaN", "1e999", "[" * 5000 + "]" * 5000,
        '{"type": 1}',
        '{"type": "connection_init", "payload": "\\ud800"}',
        '{"type": "subscribe", "id": ["1"], "payload": {"query": "{ models { id } }"}}',
        '{"type": "subscribe", "id": "1", "payload": 5}',
        '{"type": "subscribe", "id": "1", "payload": {"query": 5}}',
        '{"type": "subscribe", "id": "1", "payload": {"query": "{ x }", "variables": 1}}',
    ):  # fmt: skip
        async with served.connect("/graphql", subprotocols=["graphql-transport-ws"]) as ws:
            if "connection_init" not in garbage:
                await send(ws, {"type": "connection_init"})
                assert (await recv(ws))["type"] == "connection_ack"
            await send(ws, garbage)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None, garbage
            assert closed.value.rcvd.code == 4400, (garbage[:40], closed.value.rcvd)


async def test_a_huge_model_name_is_echoed_truncated_on_every_transport(
    make_runtime: MakeRuntime,
) -> None:
    name = "m" * 1_000_000
    async with serve(make_runtime, "server.max_body_bytes=2097152") as big:
        async with httpx.AsyncClient(base_url=big.http, timeout=30) as http:
            body = {"model": name, "messages": HI}
            error = openai_error(await http.post(CHAT, json=body), 404, "http")
            assert error["code"] == "model_not_found"
            assert len(error["message"]) < 300 and "1000000 chars" in error["message"]
            ollama = await http.post("/api/generate", json={"model": name, "prompt": "hi"})
            assert ollama.status_code == 404 and len(ollama.json()["error"]) < 300
            document = 'mutation($m: String!) { generateText(model: $m, prompt: "hi") { text } }'
            answer = await http.post("/graphql", json={"query": document, "variables": {"m": name}})
            message = answer.json()["errors"][0]["message"]
            assert len(message) < 300 and "1000000 chars" in message
            path = await http.get("/v1/models/" + "x" * 5000)
            assert len(openai_error(path, 404, "path")["message"]) < 300
            nowhere = await http.get("/" + "y" * 5000)
            assert len(openai_error(nowhere, 404, "no route")["message"]) < 300
        async with big.connect(max_size=None) as ws:
            await send(ws, {"message": "hi", "model": name})
            frames = await turn(ws)
            error = assert_error(frames[-1], "invalid_request_error", "model_not_found")
            assert len(error["message"]) < 300
        server = GrpcServer(big.runtime, host="127.0.0.1", port=0, health_interval_s=0.05)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream(
                    "/tiffin.v1.Inference/Chat",
                    request_serializer=pb.ChatRequest.SerializeToString,
                    response_deserializer=pb.ChatChunk.FromString,
                )
                request = pb.ChatRequest(
                    model=name, messages=[pb.ChatMessage(role="user", content="hi")]
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in call(request, timeout=30):
                        pass
                assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value
                assert len(raised.value.details() or "") < 300
        finally:
            await server.stop(0)


async def test_grpc_invalid_utf8_and_non_finite_numbers_are_invalid_argument(
    served: Served,
) -> None:
    server = GrpcServer(served.runtime, host="127.0.0.1", port=0, health_interval_s=0.05)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_stream(
                "/tiffin.v1.Inference/Chat", request_serializer=None, response_deserializer=None
            )
            hi = [pb.ChatMessage(role="user", content="hi")]
            # "\ud800" encoded as if UTF-8 could hold it (WTF-8): protobuf refuses the string.
            lone = pb.ChatMessage(role="user", content="hi?").SerializeToString()
            lone = lone.replace(b"hi?", b"\xed\xa0\x80")
            assert len(lone) == 0x0B
            payloads = [pb.ChatRequest(model="m1").SerializeToString() + b"\x12\x0b" + lone]
            doubles = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty")
            for field in (*doubles, "frequency_penalty"):
                for value in (float("inf"), float("-inf"), float("nan")):
                    request = pb.ChatRequest(model="m1", messages=hi, **{field: value})
                    payloads.append(request.SerializeToString())
            for payload in payloads:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in raw(payload, timeout=5):
                        pass
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    finally:
        await server.stop(0)
