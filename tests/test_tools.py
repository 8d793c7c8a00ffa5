"""Function tools (runtime/tools.py): checking `tools` and `tool_choice`, the schema a forced
call decodes under, and the scanner that turns its text into tool calls as it streams, whatever
the chunk boundaries."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import jsonschema
import pytest

from runtime.tools import ToolCallScanner, plan_tools
from runtime.types import Chunk, GenerationRequest, HandlerError, ToolCall

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def request(**fields: Any) -> GenerationRequest:
    return GenerationRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


def scan(text: str, cuts: list[int]) -> tuple[list[ToolCall], str | None]:
    """Feed `text` to a scanner in pieces cut at `cuts`; the pieces out and the finish."""
    scanner = ToolCallScanner()
    bounds = [0, *sorted(cuts), len(text)]
    pieces: list[ToolCall] = []
    finish = None
    for start, end in itertools.pairwise(bounds):
        last = end == len(text)
        chunk = scanner.feed(Chunk(text=text[start:end], finish_reason="stop" if last else None))
        pieces += chunk.tool_calls
        finish = chunk.finish_reason
    return pieces, finish


def whole(pieces: list[ToolCall]) -> list[tuple[str, str]]:
    calls: list[list[str]] = []
    for piece in pieces:
        if piece.id:
            assert piece.id.startswith("call_") and piece.name
            calls.append([piece.name, piece.arguments])
        else:
            assert not piece.name
            calls[-1][1] += piece.arguments
    return [(name, arguments) for name, arguments in calls]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\" {x}", "days": 2}}',
            [("get_weather", '{"city": "Paris, \\"FR\\" {x}", "days": 2}')],
        ),
        (
            '[{"name":"get_time","arguments":{}}, {"name": "get_weather", "arguments": '
            '{"city": "Oslo", "nested": {"a": [1, {"b": "}"}]}}}]',
            [
                ("get_time", "{}"),
                ("get_weather", '{"city": "Oslo", "nested": {"a": [1, {"b": "}"}]}}'),
            ],
        ),
    ],
)
def test_calls_are_recovered_whatever_the_chunk_boundaries(
    text: str, expected: list[tuple[str, str]]
) -> None:
    rng = random.Random(7)
    for cuts in [[], list(range(1, len(text))), *[rng.sample(range(1, len(text)), 5)] * 20]:
        pieces, finish = scan(text, cuts)
        assert whole(pieces) == expected
        assert finish == "tool_calls"
        for _, arguments in whole(pieces):
            json.loads(arguments)


def test_the_name_is_sent_before_the_arguments_arrive() -> None:
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    head = text.index("{", 1) + 1  # up to and including the arguments' opening brace
    pieces, _ = scan(text, [head])
    assert pieces[0].name == "get_weather" and pieces[0].arguments == "{"
    assert "".join(p.arguments for p in pieces[1:]) == '"city": "Paris"}'


def test_the_call_schema_holds_only_the_allowed_calls() -> None:
    forced = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"))
    assert forced is not None
    schema = forced.call_schema()
    jsonschema.validate([{"name": "get_time", "arguments": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"days": 1}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)

    named = plan_tools(
        request(
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    assert named is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, named.call_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, named.call_schema())

    single = plan_tools(request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert single is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "x"}}, single.call_schema())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER]}, "tool_choice"),  # no choice means "auto"
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools.0.type"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "none"},
            "tools.0.function.name",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
                "tool_choice": "required",
            },
            "tools.0.function.parameters",
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools.1.function.name"),
    ],
)
def test_bad_tools_are_refused_naming_the_parameter(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(HandlerError) as refused:
        plan_tools(request(**fields))
    assert refused.value.status == 400
    assert refused.value.param == param


def test_none_calls_nothing() -> None:
    plan = plan_tools(request(tools=[WEATHER], tool_choice="none"))
    assert plan is not None and not plan.forced
