"""WebSocket transport: the route table's `ws` rows on the HTTP port. A socket's frames become
Events for the Dispatcher, as HTTP requests do; what comes back becomes frames (the protocol is
in runtime/transports/ws_frames.py).

- `turns` rows (`/ws/chat`): each chat frame is one dispatch; turns run one at a time and a
  `cancel` frame closes the handler's stream, which frees the engine. A slow reader slows the
  generation (sending waits for room in a bounded queue) instead of growing memory.
- `feed` rows (`/ws/models`, `/ws/metrics`): one dispatch per socket with the query parameters;
  every item of the stream is a frame, and a slow reader loses the oldest ones.

Auth: the upgrade request's `Authorization` header, or a `token` query parameter passed on as
`authorization: Bearer <token>`. A 401/403 from `before_request` (or the handler) is sent as an
error frame, then the socket is closed with 1008 (policy violation).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from runtime.config_schema import WsMode
from runtime.errors import quoted
from runtime.transports import ws_frames as frames
from runtime.transports.ws_outbox import Close, Outbox
from runtime.types import Event, HandlerError, Reply, close

if TYPE_CHECKING:
    from fastapi import FastAPI

    from runtime.app import Runtime

POLICY_VIOLATION = 1008
INTERNAL_ERROR = 1011
_log = structlog.get_logger("tiffin.ws")


def mount_websockets(app: FastAPI, runtime: Runtime) -> None:
    """One WebSocket route per row of the route table with a `ws` column."""
    for name, route in runtime.settings.handlers.routes.items():
        if route.ws is None:
            continue
        serve = ChatSocket if route.ws.mode is WsMode.turns else FeedSocket
        app.router.add_websocket_route(
            route.ws.path, _endpoint(runtime, name, serve), name=f"ws_{name}"
        )


def _endpoint(
    runtime: Runtime, route: str, serve: type[Socket]
) -> Callable[[WebSocket], Awaitable[None]]:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await serve(runtime, route, websocket).run()

    return endpoint


class Socket:
    """One client connection: a writer task drains the outbox, a pinger keeps it alive, and
    `run` reads client frames until the client leaves or the outbox closes the socket."""

    drop_oldest = False

    def __init__(self, runtime: Runtime, route: str, websocket: WebSocket) -> None:
        self.runtime = runtime
        self.route = route
        self.websocket = websocket
        server = runtime.settings.server
        self.ping_interval = server.ws_ping_interval_s
        self.outbox = Outbox(server.ws_send_queue, drop_oldest=self.drop_oldest)
        self.max_frame_bytes = server.max_body_bytes  # HTTP's body limit, for each frame
        self.too_large = HandlerError(
            413,
            f"frame is larger than the limit of {server.max_body_bytes} bytes",
            code="request_too_large",
        )
        query = dict(websocket.query_params)
        token = query.pop("token", None)  # a secret: not for the handler's query or the logs
        headers = dict(websocket.headers.items())
        if token and "authorization" not in headers:
            headers["authorization"] = f"Bearer {token}"
        self.headers: Mapping[str, str] = headers
        self.query: Mapping[str, str] = query

    def event(self, body: Any = None, request_id: str | None = None) -> Event:
        event = Event(
            body=body, headers=self.headers, query=self.query, transport="ws", route=self.route
        )
        if request_id:
            event.request_id = request_id
        return event

    async def run(self) -> None:
        tasks = [asyncio.ensure_future(self._write())]
        if self.ping_interval > 0:
            tasks.append(asyncio.ensure_future(self._ping()))
        try:
            await self.opened()
            while True:
                try:
                    message = await self.websocket.receive()
                except (WebSocketDisconnect, RuntimeError):
                    break
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:
                    self.reject(frames.invalid("binary frames are not supported; send JSON text"))
                    continue
                if _too_large(message["text"], self.max_frame_bytes):
                    self.reject(self.too_large)
                    continue
                try:
                    frame = frames.parse(message["text"])
                    if frame["type"] == "ping":
                        self.outbox.put_control({"type": "pong"})
                    elif frame["type"] != "pong":
                        await self.received(frame)
                except HandlerError as exc:
                    self.reject(exc)
        finally:
            await self.closed()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def reject(self, exc: HandlerError) -> None:
        """An error frame about a client frame (ahead of queued frames); the socket stays open."""
        self.outbox.put_control(frames.error(exc))

    async def fail(self, exc: HandlerError, turn: str | None = None) -> None:
        """An error frame after the frames queued so far; auth failures then close with 1008."""
        await self.outbox.put(frames.error(exc, turn))
        if exc.status in (401, 403):
            self.outbox.close(POLICY_VIOLATION, exc.message[:120])

    async def opened(self) -> None:
        """Called once the socket is accepted."""

    async def received(self, frame: frames.Frame) -> None:
        raise frames.invalid(
            f"unknown frame type {quoted(frame['type'])} on this socket", param="type"
        )

    async def closed(self) -> None:
        """Called when the socket is over, however it ended."""

    async def _write(self) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                item = await self.outbox.get()
                if isinstance(item, Close):
                    await self.websocket.close(item.code, item.reason)
                    return
                await self.websocket.send_text(json.dumps(item, separators=(",", ":")))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            self.outbox.put_control({"type": "ping"})


class ChatSocket(Socket):
    """`turns`: each chat frame is one request to the route's handler; one turn at a time."""

    def __init__(self, runtime: Runtime, route: str, websocket: WebSocket) -> None:
        super().__init__(runtime, route, websocket)
        self.history: list[dict[str, Any]] = []
        self.turn: asyncio.Task[None] | None = None
        self.cancel_requested = False

    async def received(self, frame: frames.Frame) -> None:
        if frame["type"] == "cancel":
            if self.turn is not None and not self.turn.done():
                self.cancel_requested = True
                self.turn.cancel()
            return
        if frame["type"] != "chat":
            await super().received(frame)
        turn = frames.turn_id(frame)
        if self.turn is not None and not self.turn.done():
            raise frames.invalid(
                "a turn is still running: wait for its `done` frame or send a cancel",
                code="turn_in_progress",
            )
        body = frames.chat_body(frame, self.history)
        self.cancel_requested = False
        remember = "message" in frame
        self.turn = asyncio.ensure_future(self._turn(turn, body, remember))

    async def closed(self) -> None:
        if self.turn is not None and not self.turn.done():
            self.turn.cancel()
            await asyncio.gather(self.turn, return_exceptions=True)

    async def _turn(self, turn: str, body: dict[str, Any], remember: bool) -> None:
        out = frames.TurnFrames(turn)
        try:
            await self.outbox.put(out.start())
            await self._generate(out, self.event(body, turn))
        except asyncio.CancelledError:
            if not self.cancel_requested:
                raise  # the socket is closing
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self.outbox.put(out.done("cancelled"))
            return
        except TimeoutError:
            await self.fail(
                HandlerError(504, "the turn ran past its deadline", type="timeout"), turn
            )
            return
        except HandlerError as exc:
            await self.fail(exc, turn)
            return
        except Exception:
            _log.exception("chat turn failed", route=self.route, turn=turn)
            await self.fail(HandlerError(500, "internal server error", type="server_error"), turn)
            return
        await self.outbox.put(out.done())
        if remember:
            self.history = [*body["messages"], out.assistant_turn()]
            del self.history[: -frames.HISTORY_LIMIT]

    async def _generate(self, out: frames.TurnFrames, event: Event) -> None:
        """Dispatch one turn and send its frames; the handler's stream is closed however this
        ends (done, cancel, deadline, socket gone), which stops the generation."""
        dispatcher = self.runtime.dispatcher
        ctx = dispatcher.context(event)
        stream: Any = None
        try:
            async with asyncio.timeout(ctx.remaining):
                result = await dispatcher.dispatch(self.route, event, ctx)
                if isinstance(result, Reply):
                    result = result.body
                if isinstance(result, Mapping):
                    for frame in out.whole(result):
                        await self.outbox.put(frame)
                    return
                stream = result
                async for chunk in stream:
                    for frame in out.chunk(chunk):
                        await self.outbox.put(frame)
        except BaseException:
            ctx.cancelled.set()
            raise
        finally:
            await close(stream)


class FeedSocket(Socket):
    """`feed`: one request per socket; every item of its stream is a frame."""

    drop_oldest = True

    def __init__(self, runtime: Runtime, route: str, websocket: WebSocket) -> None:
        super().__init__(runtime, route, websocket)
        self.pump: asyncio.Task[None] | None = None

    async def opened(self) -> None:
        self.pump = asyncio.ensure_future(self._pump())

    async def closed(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
            await asyncio.gather(self.pump, return_exceptions=True)

    async def _pump(self) -> None:
        dispatcher = self.runtime.dispatcher
        event = self.event()
        ctx = dispatcher.context(event)
        ctx.deadline = None  # a subscription lasts as long as the socket
        stream: Any = None
        try:
            result = await dispatcher.dispatch(self.route, event, ctx)
            if isinstance(result, Reply):
                result = result.body
            if not hasattr(result, "__aiter__") or isinstance(result, Mapping):
                await self.outbox.put(result)
                self.outbox.close(1000)
                return
            stream = result
            async for item in stream:
                await self.outbox.put(item)
            self.outbox.close(1000)
        except HandlerError as exc:
            await self.fail(exc)
            self.outbox.close(POLICY_VIOLATION if exc.status < 500 else INTERNAL_ERROR)
        except Exception:
            _log.exception("feed failed", route=self.route)
            await self.fail(HandlerError(500, "internal server error", type="server_error"))
            self.outbox.close(INTERNAL_ERROR)
        finally:
            ctx.cancelled.set()
            await close(stream)


def _too_large(text: str, limit: int) -> bool:
    """Whether `text` is over `limit` bytes in UTF-8 (encoding only when it could be)."""
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)
