"""Function tools on the generation path: checking `tools` and `tool_choice`, and making a model
call them.

With `tool_choice` `"required"` or a named function, any model calls a tool: it decodes under
the JSON Schema of a call (`{"name": ..., "arguments": {...}}`, or an array of them when
parallel calls are allowed), built from the tools' own `parameters`, so the arguments always
parse and match their schema. `ToolCallScanner` turns that text into tool calls as it streams:
the name as soon as it is complete, then the arguments piece by piece.

`"none"` renders no tools and calls none. `"auto"` is not decoded under a grammar, so it is
refused by name until the model's own tool-call syntax is parsed (issue 17).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from runtime.types import Chunk, GenerationRequest, HandlerError, ToolCall

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NAME_VALUE = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _refuse(param: str, message: str) -> HandlerError:
    return HandlerError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask of the generation."""

    functions: dict[str, dict[str, Any]]  # name -> its `parameters` schema
    choice: str  # "none", "required" or the one function's name
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.choice != "none"

    def call_schema(self) -> dict[str, Any]:
        """The JSON Schema every output must match: one call of an allowed function, or (with
        parallel calls) an array of one to len(tools) of them. `name` comes first, so a stream
        can say which function is called before its arguments arrive."""
        names = [self.choice] if self.choice in self.functions else list(self.functions)
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": self.functions[name],
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in names
        ]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.parallel and self.choice not in self.functions:
            # At most one call per tool: a weak model would otherwise repeat calls until
            # max_tokens cut the last one short.
            return {"type": "array", "items": one, "minItems": 1, "maxItems": len(names)}
        return one


def plan_tools(request: GenerationRequest) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (a 400 naming the parameter otherwise) and say what
    they ask; None when the request names no tools."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise _refuse("tool_choice", "a tool_choice needs tools")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for position, tool in enumerate(request.tools):
        where = f"tools.{position}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _refuse(f"{where}.type", "only function tools are supported")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _refuse(f"{where}.function", "an object with the function's name is required")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise _refuse(f"{where}.function.name", "1-64 letters, digits, _ or -")
        if name in functions:
            raise _refuse(f"{where}.function.name", f"{name!r} is declared twice")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise _refuse(f"{where}.function.parameters", "a JSON Schema of type object")
        functions[name] = {"type": "object", **parameters}
    return ToolPlan(functions, _choice(choice, functions), request.parallel_tool_calls)


def _choice(choice: str | dict[str, Any] | None, functions: dict[str, Any]) -> str:
    """ "none", "required" or a function's name. Without a tool_choice, tools mean "auto", as
    in OpenAI's API."""
    if choice in ("none", "required"):
        return str(choice)
    if choice is None or choice == "auto":
        raise _refuse(
            "tool_choice",
            "'auto' (the default when tools are given) is not supported yet; use 'required' "
            'or name a function ({"type": "function", "function": {"name": ...}})',
        )
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name in functions:
            return name
        raise _refuse("tool_choice.function.name", f"{name!r} is not one of the tools")
    raise _refuse("tool_choice", "'none', 'auto', 'required' or a named function")


@dataclass
class _Call:
    index: int
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    head: list[str] = field(default_factory=list)  # the object's text up to its arguments


class ToolCallScanner:
    """Turns the text of a grammar-constrained call (or array of calls) into tool-call chunks
    as it streams: a call's id and name once its `"arguments":` key is reached, then the
    arguments' own JSON text as it comes. A scanner per choice."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.array = False
        self.call: _Call | None = None
        self.calls = 0
        self.args_depth: int | None = None  # the depth the arguments object opened at
        self.args_key = False  # `"arguments":` read; its object opens next

    def feed(self, chunk: Chunk) -> Chunk:
        """The same chunk with its text turned into `tool_calls` (and `finish_reason`
        "tool_calls" instead of "stop")."""
        calls: list[ToolCall] = []
        for char in chunk.text:
            self._scan(char, calls)
        merged = _merge(calls)
        finish = chunk.finish_reason
        if finish == "stop" and self.calls:
            finish = "tool_calls"
        return Chunk(
            index=chunk.index,
            finish_reason=finish,
            usage=chunk.usage,
            model=chunk.model,
            tool_calls=merged,
        )

    def _scan(self, char: str, out: list[ToolCall]) -> None:
        call = self.call
        if self.args_depth is not None and call is not None:
            out.append(ToolCall(call.index, "", "", char))  # the arguments' own text
        elif call is not None:
            call.head.append(char)
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char in "{[":
            if self.depth == 0 and char == "[":
                self.array = True
            elif call is None:  # a call object opens
                self.call = _Call(self.calls, head=[char])
            elif self.args_key and self.args_depth is None:  # its arguments open
                self.args_key = False
                self.args_depth = self.depth
                match = _NAME_VALUE.search("".join(call.head))
                name = json.loads(f'"{match.group(1)}"') if match else ""
                out.append(ToolCall(call.index, call.id, name, char))
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            if self.args_depth is not None and self.depth == self.args_depth:
                self.args_depth = None
            elif call is not None and self.depth == (1 if self.array else 0):
                self.call = None  # the call object closed
                self.calls += 1
        elif char == ":" and call is not None and self.args_depth is None:
            self.args_key = re.search(r'"arguments"\s*:$', "".join(call.head)) is not None


def _merge(calls: list[ToolCall]) -> list[ToolCall]:
    """Consecutive argument pieces of one call as one piece."""
    merged: list[ToolCall] = []
    for call in calls:
        last = merged[-1] if merged else None
        if last is not None and not call.id and last.index == call.index and not call.name:
            merged[-1] = ToolCall(last.index, last.id, last.name, last.arguments + call.arguments)
        else:
            merged.append(call)
    return merged
