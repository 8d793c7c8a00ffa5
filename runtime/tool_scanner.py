"""Reads tool calls out of a model's JSON as it streams.

The model writes JSON that a grammar holds to one of three layouts (runtime/tools.py):

- `CALL`: one call, `{"name": "f", "arguments": {...}}` (a named function, or one call only);
- `CALLS`: an array of calls (`tool_choice: "required"` with parallel calls);
- `EITHER`: `{"tool_calls": [calls]}` or `{"response": "text"}` (`"auto"` on a model whose
  template knows no tools: it answers or calls).

`ToolCallScanner.feed` turns each chunk's text into what the client sees: a call's id and name
as soon as its arguments open (the schemas put `name` first), then the arguments' own JSON text
piece by piece, and a `response` string's decoded text as ordinary content. It reads one
character at a time with a stack of open containers, so chunk boundaries never matter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from runtime.types import Chunk, ToolCall

CALL = "call"
CALLS = "calls"
EITHER = "either"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


@dataclass
class _Container:
    kind: str  # "{" or "["
    role: str  # "call", "calls", "arguments", "root" or "" (nothing of ours)
    key: str = ""  # an object's current key
    reading_key: bool = True  # an object's next string is a key


@dataclass
class _String:
    role: str  # "key", "name", "response" or "" (skipped)
    text: list[str] = field(default_factory=list)
    escape: str | None = None  # after a backslash: "" or the \u digits so far
    high: int | None = None  # a \u high surrogate waiting for its low half


class ToolCallScanner:
    """One choice's scanner; `layout` is CALL, CALLS or EITHER."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.stack: list[_Container] = []
        self.string: _String | None = None
        self.calls = 0  # calls begun
        self.call_id = ""
        self.name = ""
        self.args_level: int | None = None  # stack depth where the arguments object opened
        self._calls: list[ToolCall] = []
        self._text: list[str] = []

    def feed(self, chunk: Chunk) -> Chunk:
        """The chunk as the client sees it: its text turned into tool-call pieces and content,
        and "stop" as "tool_calls" once a call was made."""
        for char in chunk.text:
            self._char(char)
        calls, self._calls = _merged(self._calls), []
        text, self._text = "".join(self._text), []
        return reshaped(chunk, text, calls, called=self.calls > 0)

    # --- one character --------------------------------------------------------------------------

    def _char(self, char: str) -> None:
        if self.args_level is not None:
            self._calls.append(ToolCall(self.calls - 1, "", "", char))
        if self.string is not None:
            self._string_char(char)
        elif char == '"':
            self._open_string()
        elif char in "{[":
            self._open(char)
        elif char in "}]":
            self.stack.pop()
            if self.args_level is not None and len(self.stack) == self.args_level:
                self.args_level = None  # the arguments object closed (its `}` was sent)
        elif self.stack and self.stack[-1].kind == "{":
            top = self.stack[-1]
            if char == ",":
                top.reading_key = True
            elif char == ":":
                top.reading_key = False

    def _open(self, kind: str) -> None:
        role = self._role_of_child(kind)
        self.stack.append(_Container(kind, role))
        if role == "call":
            self.calls += 1
            self.call_id = f"call_{uuid.uuid4().hex[:24]}"
            self.name = ""
        elif role == "arguments":
            self.args_level = len(self.stack) - 1
            self._calls.append(ToolCall(self.calls - 1, self.call_id, self.name, kind))

    def _role_of_child(self, kind: str) -> str:
        """What a container opening here is, from where it opens."""
        if not self.stack:
            if self.layout == CALL and kind == "{":
                return "call"
            return "calls" if self.layout == CALLS and kind == "[" else "root"
        parent = self.stack[-1]
        if self.args_level is not None:
            return ""
        if parent.role == "calls" and kind == "{":
            return "call"
        if parent.role == "root" and parent.key == "tool_calls" and kind == "[":
            return "calls"
        if parent.role == "call" and parent.key == "arguments" and kind == "{":
            return "arguments"
        return ""

    def _open_string(self) -> None:
        top = self.stack[-1] if self.stack else None
        role = ""
        if top is not None and top.kind == "{" and self.args_level is None:
            if top.reading_key:
                role = "key"
            elif top.role == "call" and top.key == "name":
                role = "name"
            elif top.role == "root" and top.key == "response" and self.layout == EITHER:
                role = "response"
        self.string = _String(role)

    def _string_char(self, char: str) -> None:
        string = self.string
        assert string is not None
        if string.escape is None:
            if char == '"':
                self._close_string(string)
            elif char == "\\":
                string.escape = ""
            else:
                self._emit(string, char)
            return
        if string.escape == "" and char != "u":
            string.escape = None
            self._emit(string, _ESCAPES.get(char, char))
            return
        string.escape += char
        if len(string.escape) == 5:  # "u" and four hex digits
            code = int(string.escape[1:], 16)
            string.escape = None
            if 0xD800 <= code < 0xDC00:
                string.high = code
            elif 0xDC00 <= code < 0xE000 and string.high is not None:
                pair = 0x10000 + ((string.high - 0xD800) << 10) + (code - 0xDC00)
                string.high = None
                self._emit(string, chr(pair))
            else:
                self._emit(string, chr(code))

    def _emit(self, string: _String, text: str) -> None:
        if string.role == "response":
            self._text.append(text)
        elif string.role:
            string.text.append(text)

    def _close_string(self, string: _String) -> None:
        self.string = None
        value = "".join(string.text)
        if string.role == "key":
            self.stack[-1].key = value
        elif string.role == "name":
            self.name = value


def reshaped(chunk: Chunk, text: str, calls: list[ToolCall], *, called: bool) -> Chunk:
    """`chunk` as the client sees it: `text` and `calls` in place of the model's text, and
    "stop" as "tool_calls" once the choice has made a call (`called`)."""
    finish = "tool_calls" if chunk.finish_reason == "stop" and called else chunk.finish_reason
    return Chunk(
        index=chunk.index,
        text=text,
        finish_reason=finish,
        usage=chunk.usage,
        model=chunk.model,
        tool_calls=calls,
    )


def _merged(pieces: list[ToolCall]) -> list[ToolCall]:
    """Consecutive pieces of one call as one piece."""
    merged: list[ToolCall] = []
    for piece in pieces:
        last = merged[-1] if merged else None
        if last is not None and not piece.id and last.index == piece.index:
            merged[-1] = ToolCall(last.index, last.id, last.name, last.arguments + piece.arguments)
        else:
            merged.append(piece)
    return merged
