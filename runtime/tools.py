"""Function tools on the generation path: checking `tools` and `tool_choice`, and making a local
model call them.

Any model calls tools here, the packaged base Gemma included: it decodes under a JSON Schema
built from the tools' own `parameters`, with a system prompt that describes them, so every call
parses and matches its schema. `tool_choice` picks the schema:

- a named function: one call of it (`{"name": ..., "arguments": {...}}`);
- `"required"`: one call of any tool, or an array of one to len(tools) calls when
  `parallel_tool_calls` (the default);
- `"auto"` (the default when tools are given): either `{"tool_calls": [...]}` or
  `{"response": "text"}`, so the model answers or calls, as llama.cpp's server does for
  templates that know no tools;
- `"none"`: no schema and no call.

runtime/tool_scanner.py reads the calls out of that JSON as it streams.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from runtime.tool_scanner import CALL, CALLS, EITHER
from runtime.types import GenerationRequest, HandlerError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _refuse(param: str, message: str) -> HandlerError:
    return HandlerError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask of the generation."""

    functions: dict[str, dict[str, Any]]  # name -> its `parameters` schema
    descriptions: dict[str, str]
    choice: str  # "none", "auto", "required" or the one function's name
    parallel: bool

    @property
    def calls(self) -> bool:
        """Whether the model may call a tool at all."""
        return self.choice != "none"

    @property
    def layout(self) -> str:
        """The shape of the model's JSON (runtime/tool_scanner.py)."""
        if self.choice == "auto":
            return EITHER
        if self.choice == "required" and self.parallel:
            return CALLS
        return CALL

    def schema(self) -> dict[str, Any]:
        """The JSON Schema the model's output must match. `name` comes before `arguments`, so a
        stream can say which function is called before its arguments arrive."""
        names = [self.choice] if self.choice in self.functions else list(self.functions)
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": self.functions[name]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in names
        ]
        one: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        # At most one call per tool: a weak model would otherwise repeat calls until
        # max_tokens cut the last one short.
        most = len(names) if self.parallel else 1
        several = {"type": "array", "items": one, "minItems": 1, "maxItems": most}
        if self.layout == CALL:
            return one
        if self.layout == CALLS:
            return several
        return {
            "anyOf": [
                _only("response", {"type": "string"}),
                _only("tool_calls", several),
            ]
        }

    def prompt(self) -> str:
        """What the model is told about the tools (a system message)."""
        described = "\n".join(
            f"- {name}: arguments {json.dumps(parameters, separators=(',', ':'))}"
            + (f". {self.descriptions[name]}" if self.descriptions.get(name) else "")
            for name, parameters in self.functions.items()
        )
        if self.layout == EITHER:
            how = (
                'Reply with JSON only: {"response": "your answer"} to answer, or '
                '{"tool_calls": [{"name": "...", "arguments": {...}}]} to call functions.'
            )
        else:
            how = 'Call a function, with JSON only: {"name": "...", "arguments": {...}}.'
        return f"You can call these functions:\n{described}\n{how}"


def _only(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {key: value},
        "required": [key],
        "additionalProperties": False,
    }


def with_tools(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation as a model that knows no tool syntax reads it: the tools described in
    the system message, earlier calls as the JSON the model would have written, and tool
    results as user turns that say which call they answer."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _parsed(c["function"]["arguments"])}
                for c in message["tool_calls"]
            ]
            written = calls[0] if plan.layout == CALL else calls
            key = {"tool_calls": calls} if plan.layout == EITHER else written
            out.append({"role": "assistant", "content": json.dumps(key)})
        elif role == "tool":
            answered = message.get("tool_call_id", "")
            out.append({"role": "user", "content": f"Result of call {answered}: {content}"})
        else:
            out.append(dict(message))
    if out and out[0].get("role") in ("system", "developer"):
        out[0] = {**out[0], "role": "system", "content": f"{plan.prompt()}\n\n{out[0]['content']}"}
    else:
        out.insert(0, {"role": "system", "content": plan.prompt()})
    return out


def _parsed(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def plan_tools(request: GenerationRequest) -> ToolPlan | None:
    """Check `tools` and `tool_choice` (a 400 naming the parameter otherwise) and say what
    they ask; None when the request names no tools."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none"):
            raise _refuse("tool_choice", "a tool_choice needs tools")
        return None
    functions: dict[str, dict[str, Any]] = {}
    descriptions: dict[str, str] = {}
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
        descriptions[name] = str(function.get("description") or "")
    choice_made = _choice(choice, functions)
    return ToolPlan(functions, descriptions, choice_made, request.parallel_tool_calls)


def _choice(choice: str | dict[str, Any] | None, functions: dict[str, Any]) -> str:
    """ "none", "auto", "required" or a function's name. Without a tool_choice, tools mean
    "auto", as in OpenAI's API."""
    if choice is None:
        return "auto"
    if isinstance(choice, dict) and choice.get("type") in ("none", "auto", "required"):
        choice = str(choice["type"])  # the object form gRPC's ToolChoice takes
    if choice in ("none", "auto", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and name in functions:
            return name
        raise _refuse("tool_choice.function.name", f"{name!r} is not one of the tools")
    raise _refuse("tool_choice", "'none', 'auto', 'required' or a named function")
