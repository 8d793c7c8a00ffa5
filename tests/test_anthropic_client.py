"""The official `anthropic` client against a served `python -m runtime` with the default models:
Anthropic's Messages API (messages, streams, tools, count_tokens) and its error shape."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.conftest import ROOT
from tests.served import Served, serving_default_models

pytestmark = pytest.mark.slow

MODEL = "gemma-3-270m"
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_default_models(tmp_path_factory.mktemp("anthropic")) as served:
        yield served


@pytest.fixture
def client(served: Served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_a_message_whole_and_streamed(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 12,
        # Sampling parameters are not in this SDK's signature any more; Tiffin still takes them.
        "extra_body": {"temperature": 0},
        "system": "Be brief.",
        "messages": ask("Name a colour."),
    }
    whole = client.messages.create(**fields)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.stop_reason in ("end_turn", "max_tokens")
    assert [block.type for block in whole.content] == ["text"]
    assert 0 < whole.usage.output_tokens <= 12 and whole.usage.input_tokens > 0

    with client.messages.stream(**fields) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_a_stop_sequence_that_ends_the_answer_is_named(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 24,
        "extra_body": {"temperature": 0},
        "messages": ask("Count from one to ten."),
    }
    text = client.messages.create(**fields).content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) >= 3, text
    stop = words[len(words) // 2]  # a word greedy decoding is known to reach
    fields["stop_sequences"] = ["a stop string it never writes", stop]
    whole = client.messages.create(**fields)
    assert (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", stop)
    answer = whole.content[0].text if whole.content else ""  # type: ignore[union-attr]
    assert answer == text[: text.index(stop)]
    with client.messages.stream(**fields) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)


def test_a_tool_is_used_with_input_that_matches_its_schema(client: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "extra_body": {"temperature": 0},
        "messages": ask("What is the weather in Paris?"),
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
    }
    whole = client.messages.create(**fields)
    assert whole.stop_reason == "tool_use"
    uses = [block for block in whole.content if block.type == "tool_use"]
    assert uses and all(use.name == "get_weather" for use in uses)
    for use in uses:
        jsonschema.validate(use.input, WEATHER["input_schema"])

    with client.messages.stream(**fields) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (use.name, use.input) for use in uses
    ]

    answered = client.messages.create(
        **{
            **fields,
            "tool_choice": {"type": "auto"},
            "messages": [
                *ask("What is the weather in Paris?"),
                {"role": "assistant", "content": [uses[0].model_dump()]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "Sunny"}
                    ],
                },
            ],
        }
    )
    assert answered.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_count_tokens_grows_with_the_conversation(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=MODEL, messages=ask("Hi"))
    longer = client.messages.count_tokens(
        model=MODEL, messages=ask("Hi, tell me about the weather in Paris today."), tools=[WEATHER]
    )
    assert 0 < short.input_tokens < longer.input_tokens


def test_errors_take_anthropics_shape(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-opus-4", max_tokens=4, messages=ask("hi"))
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"extra_body": {"temperature": 1.5}}, "temperature"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/png", "data": ""},
                            }
                        ],
                    }
                ]
            },
            "images",
        ),
    ]
    for extra, said in refusals:
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(
                **{"model": MODEL, "max_tokens": 4, "messages": ask("hi"), **extra}
            )
        error = refused.value.body["error"]  # type: ignore[index]
        assert error["type"] == "invalid_request_error" and said in error["message"]


def test_the_docs_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    page = (ROOT / "docs" / "api" / "anthropic.md").read_text()
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
    exec(example.replace("http://127.0.0.1:3000", served.url), {})
    assert capsys.readouterr().out.strip()
