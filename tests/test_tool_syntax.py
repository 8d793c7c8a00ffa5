"""Tool calls in models' own syntaxes (runtime/tool_syntax.py), on recorded-style outputs of
each format, fed in pieces cut anywhere: the calls and the text around them come out the same,
and streaming holds back only what could start a call."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from runtime.tool_syntax import GEMMA, HERMES, LLAMA3, MISTRAL, NativeCallParser, detect_format


def parse(syntax: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, dict]]]:  # type: ignore[type-arg]
    parser = NativeCallParser(syntax)
    bounds = [0, *sorted(set(cuts)), len(text)]
    content, calls = "", []
    for start, end in itertools.pairwise(bounds):
        shown, made = parser.feed_text(text[start:end])
        content += shown
        calls += made
    shown, made = parser.finish()
    content += shown
    calls += made
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(c.id.startswith("call_") for c in calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def cuttings(text: str) -> list[list[int]]:
    rng = random.Random(11)
    inner = list(range(1, len(text)))
    return [[], inner, *[rng.sample(inner, min(6, len(inner))) for _ in range(25)]]


PARIS = {"city": "Paris", "unit": "celsius"}
CASES = [
    (
        HERMES,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
        "</tool_call>",
        "Let me check.\n\n",
        [("get_weather", PARIS), ("get_time", {})],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        "",
        [("get_weather", PARIS)],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time'
        "[ARGS]{}",
        "",
        [("get_weather", PARIS), ("get_time", {})],
    ),
    (
        LLAMA3,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
        '"celsius"}}; {"name": "get_time", "parameters": {}}',
        "",
        [("get_weather", PARIS), ("get_time", {})],
    ),
    (
        LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        "",
        [("get_weather", PARIS)],
    ),
    (
        GEMMA,
        'I will look it up.\n```tool_code\nget_weather(city="Paris", unit="celsius")\n```\n',
        "I will look it up.\n\n",
        [("get_weather", PARIS)],
    ),
]


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), CASES)
def test_calls_and_text_are_found_whatever_the_chunk_boundaries(
    syntax: str,
    text: str,
    content: str,
    calls: list[tuple[str, dict]],  # type: ignore[type-arg]
) -> None:
    for cuts in cuttings(text):
        assert parse(syntax, text, cuts) == (content, calls)


@pytest.mark.parametrize("syntax", [HERMES, MISTRAL, LLAMA3, GEMMA])
def test_an_answer_without_a_call_is_all_content(syntax: str) -> None:
    text = "Paris is sunny today; {braces} and <tags> are fine. 21 C."
    for cuts in cuttings(text):
        assert parse(syntax, text, cuts) == (text, [])


def test_only_what_could_start_a_call_is_held_back() -> None:
    parser = NativeCallParser(HERMES)
    assert parser.feed_text("Sure, one moment <tool") == ("Sure, one moment ", [])
    assert parser.feed_text("ing> and more") == ("<tooling> and more", [])
    assert parser.feed_text(' <tool_call>{"name": ') == (" ", [])  # the call is open
    assert parser.finish() == ('<tool_call>{"name": ', [])  # never closed: it was text


def test_a_malformed_call_is_content_not_a_broken_call() -> None:
    text = 'Here: <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call> done'
    for cuts in cuttings(text):
        assert parse(HERMES, text, cuts) == (text, [])


@pytest.mark.parametrize(
    ("template", "syntax"),
    [
        ("{% for tool in tools %}...<tool_call>{{ tool }}</tool_call>", HERMES),
        ("{{ '[AVAILABLE_TOOLS]' }}{% if tools %}[TOOL_CALLS]{% endif %}", MISTRAL),
        ("{% if tools %}<|python_tag|>{% endif %}{{ message.role }}", LLAMA3),
        ("{% if tools %}```tool_code\n{% endif %}", GEMMA),
        ("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", None),
        (None, None),
    ],
)
def test_the_syntax_is_read_from_the_chat_template(
    template: str | None, syntax: str | None
) -> None:
    assert detect_format(template) == syntax
