"""The WebSocket frame protocol: wire types only (runtime/transports/ws.py moves the frames).

Every frame is one JSON object in a text frame, with a `type`.

Client -> server on a `turns` socket (`/ws/chat`):
  {"message": "Hi", "model": "m"}            one turn; the socket remembers the conversation
  {"messages": [...], "model": "m", ...}     one turn with the whole conversation (OpenAI's body;
                                             any chat-completions parameter may be added)
  {"type": "cancel"}                         stop the turn in progress (its engine is freed);
                                             ignored when no turn is running
  {"type": "ping"} / {"type": "pong"}        answered with a pong / ignored
A chat frame may carry `"type": "chat"` and an `"id"` (else the server picks one). Turns run one
at a time: a chat frame while a turn is running gets an error frame (code `turn_in_progress`).

Server -> client:
  {"type": "start", "id"}                              a turn was accepted
  {"type": "token", "id", "content"}                   generated text, in order
  {"type": "tool_call", "id", "call": {id, type, function: {name, arguments}}}
                                                       a tool call the model made, whole, when
                                                       the reply ends (a turn with `tools`:
                                                       docs/api/tools.md)
  {"type": "done", "id", "model", "message", "finish_reason", "usage"[, "tool_calls"]}
                                                       the turn's last frame; `message` is the
                                                       whole reply, `finish_reason` "cancelled"
                                                       after a cancel, `tool_calls` the calls
                                                       (answer one with a {"role": "tool",
                                                       "tool_call_id", "content"} message)
  {"type": "error", "id", "error": {message, type, param, code}}
                                                       OpenAI's error shape; `id` is null for a
                                                       frame that started no turn
  {"type": "ping"}                                     keepalive (no answer needed)
  {"type": "dropped", "count"}                         a feed dropped frames for a slow reader
A `feed` socket (`/ws/models`, `/ws/metrics`) sends each item of the handler's stream as it is.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.dispatch import parse_json
from runtime.errors import shown
from runtime.types import HandlerError

HISTORY_LIMIT = 100  # messages a `message`-style conversation keeps (oldest dropped)
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Frame = dict[str, Any]


def invalid(message: str, *, param: str | None = None, code: str = "invalid_frame") -> HandlerError:
    return HandlerError(400, message, code=code, param=param)


def parse(text: str) -> Frame:
    """One client frame; a HandlerError (400) says what is wrong with it."""
    frame = parse_json(text, "frame")
    if not isinstance(frame, dict):
        raise invalid(f"frame must be a JSON object, got {type(frame).__name__}")
    kind = frame.get("type", "chat")
    if not isinstance(kind, str):
        raise invalid(f"`type` must be a string, got {shown(json.dumps(kind))}", param="type")
    frame["type"] = kind
    return frame


def turn_id(frame: Frame) -> str:
    given = frame.get("id")
    if given is None:
        return uuid.uuid4().hex
    if not isinstance(given, str) or not _ID.match(given):
        raise invalid("`id` must be 1-128 characters of A-Z a-z 0-9 . _ : -", param="id")
    return given


def chat_body(frame: Frame, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The OpenAI chat-completions body of a chat frame, streamed with usage."""
    body = {k: v for k, v in frame.items() if k not in ("type", "id", "message")}
    if "message" in frame:
        if "messages" in frame:
            raise invalid("send `message` or `messages`, not both", param="messages")
        if not isinstance(frame["message"], str):
            raise invalid("`message` must be a string", param="message")
        body["messages"] = [*history, {"role": "user", "content": frame["message"]}]
    elif not isinstance(frame.get("messages"), list):
        raise invalid("a chat frame needs `message` (a string) or `messages` (a list)")
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def error(exc: HandlerError, turn: str | None = None) -> Frame:
    frame: Frame = {"type": "error", "id": turn, **exc.to_dict()}
    if "retry-after" in exc.headers:  # a rate limit: seconds until the key may try again
        frame["retry_after"] = int(exc.headers["retry-after"])
    return frame


class TurnFrames:
    """Turns one turn's OpenAI chunks (or a whole chat.completion) into token and done frames."""

    def __init__(self, turn: str) -> None:
        self.turn = turn
        self.text: list[str] = []
        self.model: str | None = None
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.tool_calls: list[dict[str, Any]] = []  # the first choice's, whole

    def start(self) -> Frame:
        return {"type": "start", "id": self.turn}

    def chunk(self, chunk: Mapping[str, Any]) -> list[Frame]:
        self.model = chunk.get("model", self.model)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        frames = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                frames.append(self._token(content, choice.get("index", 0)))
            if choice.get("index", 0) == 0:
                self._add_call_pieces(delta.get("tool_calls") or [])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
                if choice.get("index", 0) == 0:
                    frames += self._call_frames()
        return frames

    def _add_call_pieces(self, pieces: Sequence[Mapping[str, Any]]) -> None:
        """Put a stream's call pieces together (a call's first piece has its id and name)."""
        for piece in pieces:
            if piece.get("id"):
                function = dict(piece.get("function") or {})
                self.tool_calls.append(
                    {"id": piece["id"], "type": "function", "function": function}
                )
            elif self.tool_calls:
                function = self.tool_calls[-1]["function"]
                more = (piece.get("function") or {}).get("arguments", "")
                function["arguments"] = function.get("arguments", "") + more

    def _call_frames(self) -> list[Frame]:
        """A tool_call frame for each whole call (sent when the choice finishes)."""
        return [{"type": "tool_call", "id": self.turn, "call": c} for c in self.tool_calls]

    def whole(self, completion: Mapping[str, Any]) -> list[Frame]:
        """A handler (or plugin) that answered with one chat.completion, not a stream."""
        self.model = completion.get("model", self.model)
        self.usage = completion.get("usage")
        frames = []
        for choice in completion.get("choices") or ():
            message = choice.get("message") or {}
            content = message.get("content")
            if content:
                frames.append(self._token(content, choice.get("index", 0)))
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            if choice.get("index", 0) == 0 and message.get("tool_calls"):
                self.tool_calls = [dict(call) for call in message["tool_calls"]]
                frames += self._call_frames()
        return frames

    def _token(self, content: str, index: int) -> Frame:
        if index == 0:
            self.text.append(content)
            return {"type": "token", "id": self.turn, "content": content}
        return {"type": "token", "id": self.turn, "content": content, "index": index}

    @property
    def message(self) -> str:
        return "".join(self.text)

    def assistant_turn(self) -> dict[str, Any]:
        """The reply as the conversation's next message, calls included."""
        turn: dict[str, Any] = {"role": "assistant", "content": self.message}
        if self.tool_calls:
            turn["tool_calls"] = self.tool_calls
        return turn

    def done(self, finish_reason: str | None = None) -> Frame:
        extra = {"tool_calls": self.tool_calls} if self.tool_calls else {}
        return {
            "type": "done",
            "id": self.turn,
            "model": self.model,
            "message": self.message,
            "finish_reason": finish_reason or self.finish_reason,
            "usage": self.usage,
            **extra,
        }
