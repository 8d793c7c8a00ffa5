"""Function tools (runtime/tools.py, runtime/tool_scanner.py): checking `tools` and
`tool_choice`, the schema a model decodes under, the conversation it reads, and the scanner that
turns its JSON into tool calls and content as it streams, whatever the chunk boundaries."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import jsonschema
import pytest

from runtime.tool_scanner import CALL, CALLS, EITHER, ToolCallScanner
from runtime.tools import plan_tools, with_tools
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


def scan(text: str, cuts: list[int], layout: str = CALL) -> tuple[list[ToolCall], str | None, str]:
    """Feed `text` to a scanner in pieces cut at `cuts`: the call pieces out, the finish and
    the content."""
    scanner = ToolCallScanner(layout)
    bounds = [0, *sorted(cuts), len(text)]
    pieces: list[ToolCall] = []
    finish = None
    content = ""
    for start, end in itertools.pairwise(bounds):
        last = end == len(text)
        chunk = scanner.feed(Chunk(text=text[start:end], finish_reason="stop" if last else None))
        pieces += chunk.tool_calls
        content += chunk.text
        finish = chunk.finish_reason
    return pieces, finish, content


def cuttings(text: str) -> list[list[int]]:
    rng = random.Random(7)
    inner = range(1, len(text))
    return [[], list(inner), *[rng.sample(inner, min(5, len(inner))) for _ in range(20)]]


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
    ("layout", "text", "expected"),
    [
        (
            CALL,
            '{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\" {x}", "days": 2}}',
            [("get_weather", '{"city": "Paris, \\"FR\\" {x}", "days": 2}')],
        ),
        (
            CALLS,
            '[{"name":"get_time","arguments":{}}, {"name": "get_weather", "arguments": '
            '{"city": "Oslo", "nested": {"a": [1, {"b": "}"}]}}}]',
            [
                ("get_time", "{}"),
                ("get_weather", '{"city": "Oslo", "nested": {"a": [1, {"b": "}"}]}}'),
            ],
        ),
        (
            EITHER,
            '{"tool_calls": [{"name": "get_w\\u00e9ather", "arguments": {"name": "x"}}]}',
            [("get_wéather", '{"name": "x"}')],
        ),
    ],
)
def test_calls_are_recovered_whatever_the_chunk_boundaries(
    layout: str, text: str, expected: list[tuple[str, str]]
) -> None:
    for cuts in cuttings(text):
        pieces, finish, content = scan(text, cuts, layout)
        assert whole(pieces) == expected
        assert finish == "tool_calls"
        assert content == ""
        for _, arguments in whole(pieces):
            json.loads(arguments)


def test_an_answer_instead_of_a_call_is_content() -> None:
    answer = 'Line one,\n "quoted" \\ café 😀 {"not": "a call"}'
    text = json.dumps({"response": answer})
    for cuts in cuttings(text):
        pieces, finish, content = scan(text, cuts, EITHER)
        assert (pieces, finish, content) == ([], "stop", answer)


def test_the_name_is_sent_before_the_arguments_arrive() -> None:
    text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    head = text.index("{", 1) + 1  # up to and including the arguments' opening brace
    pieces, _, _ = scan(text, [head])
    assert pieces[0].name == "get_weather" and pieces[0].arguments == "{"
    assert "".join(p.arguments for p in pieces[1:]) == '"city": "Paris"}'


def test_the_call_schema_holds_only_the_allowed_calls() -> None:
    forced = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"))
    assert forced is not None
    assert forced.layout == CALLS
    schema = forced.schema()
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
    assert named.layout == CALL
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, named.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, named.schema())

    single = plan_tools(request(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False))
    assert single is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "x"}}, single.schema())

    auto = plan_tools(request(tools=[WEATHER, TIME]))  # no tool_choice: "auto"
    assert auto is not None and auto.layout == EITHER
    jsonschema.validate({"response": "It is sunny."}, auto.schema())
    jsonschema.validate({"tool_calls": [{"name": "get_time", "arguments": {}}]}, auto.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "x", "tool_calls": []}, auto.schema())


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice.function.name",
        ),
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
    assert plan is not None and not plan.calls


def test_the_model_reads_the_tools_and_earlier_calls_as_json() -> None:
    plan = plan_tools(request(tools=[WEATHER, TIME]))
    assert plan is not None
    call = {"id": "call_1", "type": "function"}
    messages = with_tools(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Time in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {**call, "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        ],
        plan,
    )
    system = messages[0]["content"]
    assert messages[0]["role"] == "system" and system.endswith("Be brief.")
    assert "get_weather" in system and '"city"' in system and "The weather in a city." in system
    assert json.loads(messages[2]["content"]) == {
        "tool_calls": [{"name": "get_time", "arguments": {"zone": "CET"}}]
    }
    assert messages[3] == {"role": "user", "content": "Result of call call_1: 12:00"}
