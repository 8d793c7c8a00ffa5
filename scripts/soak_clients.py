"""The soak test's clients (scripts/soak.py): one streaming chat request per call, on each
transport, recorded as an `Outcome` whatever happens. Each client names its requests
(`x-request-id`, gRPC metadata, the WebSocket turn id) so the server's request log can be
checked row by row afterwards.

Outcomes:
  served        the stream (or GraphQL answer) ran to its end
  disconnected  the client closed it on purpose after `disconnect_after` tokens
  refused       429 or 503 in the protocol's own shape (OpenAI error JSON, RESOURCE_EXHAUSTED
                or UNAVAILABLE, a WebSocket error frame, a GraphQL error with that status)
  failed        anything else the server answered: another status, an error mid-stream
  unanswered    no answer: the client's timeout ran out, or the connection broke
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc as pb_grpc

TRANSPORTS = ("http", "grpc", "ws", "graphql")
PROMPT = "Tell me a short story about a lighthouse."
REFUSALS = {429, 503}
GRPC_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


@dataclass
class Outcome:
    transport: str
    request_id: str
    started: float  # monotonic
    kind: str = "unanswered"  # served | disconnected | refused | failed | unanswered
    status: int | None = None  # HTTP-equivalent status, when the server gave one
    detail: str = ""  # error code / type / exception, for the report
    latency_s: float | None = None
    ttft_s: float | None = None
    tokens: int = 0

    def token(self) -> None:
        self.tokens += 1
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - self.started

    def end(self, kind: str, status: int | None = None, detail: str = "") -> Outcome:
        self.kind, self.status, self.detail = kind, status, detail
        self.latency_s = time.monotonic() - self.started
        return self

    def answered(self, status: int, detail: str) -> Outcome:
        """An error the server answered with: a refusal (429/503) or a failure."""
        return self.end("refused" if status in REFUSALS else "failed", status, detail)


@dataclass(frozen=True)
class Target:
    http: str  # http://host:port
    grpc: str  # host:port
    model: str
    max_tokens: int
    timeout_s: float
    api_key: str = ""  # sent as `Authorization: Bearer` on every transport when set


class Client:
    """One client: a connection of its transport, reused across requests (opened again after
    a deliberate disconnect), and a counter for request ids."""

    def __init__(self, target: Target, transport: str, number: int) -> None:
        self.target = target
        self.transport = transport
        self.number = number
        self.sent = 0
        self.http: httpx.AsyncClient | None = None
        self.channel: grpc.aio.Channel | None = None
        self.ws: ClientConnection | None = None

    def headers(self, request_id: str) -> dict[str, str]:
        key = self.target.api_key
        return {"x-request-id": request_id, **({"authorization": f"Bearer {key}"} if key else {})}

    def body(self) -> dict[str, Any]:
        return {
            "model": self.target.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": self.target.max_tokens,
        }

    async def request(self, disconnect_after: int | None) -> Outcome:
        self.sent += 1
        rid = f"soak-{self.transport}-{self.number}-{self.sent}"
        outcome = Outcome(self.transport, rid, time.monotonic())
        run = getattr(self, f"_{self.transport}")
        try:
            async with asyncio.timeout(self.target.timeout_s):
                result: Outcome = await run(outcome, disconnect_after)
                return result
        except TimeoutError:
            await self.reset()
            return outcome.end("unanswered", None, "client timeout")
        except (httpx.TransportError, ConnectionClosed, WebSocketException, OSError) as exc:
            await self.reset()
            return outcome.end("unanswered", None, f"{type(exc).__name__}: {exc}"[:200])

    async def reset(self) -> None:
        """Drop the connection (after a timeout or a deliberate disconnect)."""
        if self.ws is not None:
            ws, self.ws = self.ws, None
            await ws.close()
        if self.http is not None:
            http, self.http = self.http, None
            await http.aclose()
        if self.channel is not None:
            channel, self.channel = self.channel, None
            await channel.close()

    async def close(self) -> None:
        await self.reset()

    # --- OpenAI HTTP, server-sent events --------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = httpx.AsyncClient(
                base_url=self.target.http, timeout=target_timeout(self.target)
            )
        return self.http

    async def _http(self, out: Outcome, disconnect_after: int | None) -> Outcome:
        body = {**self.body(), "stream": True, "stream_options": {"include_usage": True}}
        headers = self.headers(out.request_id)
        client = self._client()
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return out.answered(r.status_code, openai_error(await r.aread()))
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return out.end("served", 200)
                data = json.loads(line[6:])
                if "error" in data:  # an error after the stream began
                    error = data["error"]
                    return out.end("failed", None, f"mid-stream {error.get('code')}")
                if any(c.get("delta", {}).get("content") for c in data.get("choices", [])):
                    out.token()
                    if disconnect_after is not None and out.tokens >= disconnect_after:
                        return out.end("disconnected")  # leaving `stream` closes the connection
        return out.end("failed", 200, "stream ended without [DONE]")

    # --- gRPC server streaming -----------------------------------------------------------------

    async def _grpc(self, out: Outcome, disconnect_after: int | None) -> Outcome:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.target.grpc)
        stub = pb_grpc.InferenceStub(self.channel)
        request = pb.ChatRequest(
            model=self.target.model,
            messages=[pb.ChatMessage(role="user", content=PROMPT)],
            max_tokens=self.target.max_tokens,
        )
        call = stub.Chat(request, metadata=tuple(self.headers(out.request_id).items()))
        try:
            async for message in call:
                if message.content:
                    out.token()
                    if disconnect_after is not None and out.tokens >= disconnect_after:
                        call.cancel()
                        return out.end("disconnected")
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
                return out.end("unanswered", None, f"UNAVAILABLE: {exc.details()}")
            status = GRPC_STATUS.get(code, 500)
            return out.answered(status, f"{code.name}: {exc.details()}"[:200])
        return out.end("served", 200)

    # --- WebSocket /ws/chat turns --------------------------------------------------------------

    async def _ws(self, out: Outcome, disconnect_after: int | None) -> Outcome:
        if self.ws is None:
            url = self.target.http.replace("http://", "ws://") + "/ws/chat"
            self.ws = await connect(
                url,
                open_timeout=self.target.timeout_s,
                close_timeout=2,
                additional_headers=self.headers("ws"),
            )
        ws = self.ws
        await ws.send(json.dumps({"type": "chat", "id": out.request_id, **self.body()}))
        while True:
            frame = json.loads(await ws.recv())
            kind = frame.get("type")
            if kind == "token" and frame.get("content"):
                out.token()
                if disconnect_after is not None and out.tokens >= disconnect_after:
                    self.ws = None
                    await ws.close()
                    return out.end("disconnected")
            elif kind == "done":
                return out.end("served", 200)
            elif kind == "error":
                error = frame["error"]
                return out.answered(ws_status(error), f"{error.get('type')}/{error.get('code')}")

    # --- GraphQL mutation (a whole answer: the schema has no generation subscription) ----------

    async def _graphql(self, out: Outcome, disconnect_after: int | None) -> Outcome:
        document = (
            "mutation($model: String!, $prompt: String!, $max: Int) {"
            " generateText(model: $model, prompt: $prompt, maxTokens: $max) { text tokens } }"
        )
        variables = {"model": self.target.model, "prompt": PROMPT, "max": self.target.max_tokens}
        response = await self._client().post(
            "/graphql",
            json={"query": document, "variables": variables},
            headers=self.headers(out.request_id),
        )
        if response.status_code != 200:
            return out.answered(response.status_code, openai_error(response.content))
        answer = response.json()
        if answer.get("errors"):
            extensions = answer["errors"][0].get("extensions") or {}
            status = int(extensions.get("status") or 500)
            message = answer["errors"][0].get("message")
            return out.answered(status, f"{extensions.get('code')}: {message}"[:200])
        out.tokens = int(answer["data"]["generateText"]["tokens"])
        out.ttft_s = time.monotonic() - out.started  # no stream: the first token is the answer
        return out.end("served", 200)


class BackToBack(threading.Thread):
    """One client per transport, each sending requests back to back until `stopping` is set,
    on a thread with its own event loop; every outcome kept in order of completion (the live
    reconfiguration test and scripts/bench_apply.py run it beside what they change)."""

    def __init__(self, target: Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        async def loop(transport: str) -> None:
            client = Client(self.target, transport, 0)
            try:
                while not self.stopping.is_set():
                    self.outcomes.append(await client.request(None))
            finally:
                await client.close()

        await asyncio.gather(*(loop(t) for t in TRANSPORTS))


def target_timeout(target: Target) -> httpx.Timeout:
    """httpx's own timeouts at the client's limit: `Client.request` enforces it as a whole."""
    return httpx.Timeout(target.timeout_s + 5)


def openai_error(content: bytes) -> str:
    """The `type/code` of an OpenAI error body, or what the body was instead."""
    try:
        error = json.loads(content)["error"]
        return f"{error['type']}/{error.get('code')}"
    except (ValueError, KeyError, TypeError):
        return f"not OpenAI error JSON: {content[:120]!r}"


def ws_status(error: dict[str, Any]) -> int:
    """The HTTP-equivalent status of a WebSocket error frame (frames carry no status)."""
    if error.get("type") == "rate_limit_error":
        return 429
    if error.get("code") in ("model_unavailable", "shutting_down"):
        return 503
    if error.get("type") in ("server_error", "timeout"):
        return 500
    return 400
