"""The official `openai` client, sync and async, against a served `python -m runtime` with the
default models: the packaged Gemma 3 270M on llama.cpp and all-MiniLM-L6-v2 for embeddings."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import ROOT
from tests.served import Served, serving_default_models

pytestmark = pytest.mark.slow

CHAT_MODEL = "gemma-3-270m"
EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_default_models(tmp_path_factory.mktemp("served")) as served:
        yield served


@pytest.fixture
def client(served: Served) -> OpenAI:
    return OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def async_client(served: Served) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_are_listed_and_retrievable(client: OpenAI) -> None:
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {CHAT_MODEL, EMBEDDING_MODEL}
    assert listed[CHAT_MODEL].owned_by == "custom_models"
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gemma-3-27b")


def test_chat_completion(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("Name a colour."), max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_and_seeded_answers_repeat(client: OpenAI) -> None:
    def answer(**fields: float | int) -> str:
        reply = client.chat.completions.create(
            model=CHAT_MODEL, messages=ask("Tell me a story."), max_tokens=24, **fields
        )
        return reply.choices[0].message.content or ""

    assert answer(temperature=0) == answer(temperature=0)
    seeded = answer(temperature=1.0, seed=11)
    assert seeded == answer(temperature=1.0, seed=11)


async def test_async_streaming_chat_with_usage(async_client: AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ask("Count to ten."),
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 3
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 12
    whole = await async_client.chat.completions.create(
        model=CHAT_MODEL, messages=ask("Count to ten."), max_tokens=12, temperature=0
    )
    assert "".join(pieces) == whole.choices[0].message.content


def test_text_completions_sync_and_streamed(client: OpenAI) -> None:
    whole = client.completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert whole.choices[0].text
    assert whole.usage is not None and whole.usage.completion_tokens <= 6
    streamed = client.completions.create(
        model=CHAT_MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_n_choices_and_logprobs(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ask("Hello"),
        max_tokens=4,
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        first = choice.logprobs.content[0]
        assert first.logprob <= 0 and len(first.top_logprobs) == 2


async def test_json_mode_returns_parseable_json(async_client: AsyncOpenAI) -> None:
    reply = await async_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ask("Return a JSON object with the sky's color."),
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"repeat_penalty": 1.5},  # lets a 270M model close the object
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_embeddings(client: OpenAI) -> None:
    # The client asks for base64 by default and decodes it: both encodings are exercised.
    result = client.embeddings.create(
        model=EMBEDDING_MODEL, input=["a cat sat on the mat", "a kitten on a rug", "tax law"]
    )
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    floats = client.embeddings.create(
        model=EMBEDDING_MODEL, input="a cat sat on the mat", encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)

    def cosine(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 0


def test_errors_arrive_as_openai_exceptions(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=CHAT_MODEL, prompt="word " * 5000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=CHAT_MODEL, messages=ask("hi"), temperature=3)
    assert bad.value.param == "temperature"


async def test_eight_concurrent_streams_share_the_model(async_client: AsyncOpenAI) -> None:
    """The default model decodes 4 sequences together (engine_settings.parallel): of 8 streams
    sent at once, 4 get their first token before any of them ends, and the rest follow in the
    slots they free. One at a time, the second stream would start after the first ended."""

    async def one(topic: int) -> tuple[float, float, int]:
        stream = await async_client.completions.create(
            model=CHAT_MODEL,
            prompt=f"Chapter {topic}. The ship left the harbour at dawn, and",
            max_tokens=48,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        first, tokens = 0.0, 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not first:
                first = time.monotonic()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return first, time.monotonic(), tokens

    results = await asyncio.gather(*(one(topic) for topic in range(8)))
    assert all(0 < tokens <= 48 for _, _, tokens in results), results
    firsts = sorted(first for first, _, _ in results)
    assert firsts[3] < min(end for _, end, _ in results)


def engine_samples(exposition: str, model: str) -> dict[str, float]:
    """The `llm_engine_*` samples of one model: name (plus a bucket's `le`) -> value."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith("llm_engine_") and f'model="{model}"' in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            if 'le="' in line:
                name += ":" + line.split('le="')[1].split('"')[0]
            found[name] = value
    return found


def test_metrics_show_the_batching_of_the_served_model(served: Served) -> None:
    """After the concurrent streams above: the engine's slots and its steps of several
    sequences reach /metrics (sampled every telemetry.sample_interval_s)."""
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=served.url, timeout=10) as http:
        found = engine_samples(http.get("/metrics").text, CHAT_MODEL)
        while not found.get("llm_engine_sequences_per_step_count"):
            assert time.monotonic() < deadline, found
            time.sleep(0.5)
            found = engine_samples(http.get("/metrics").text, CHAT_MODEL)
    assert found["llm_engine_slots_total"] == 4
    assert found["llm_engine_kv_cells_total"] == 4 * 4096
    steps = found["llm_engine_sequences_per_step_count"]
    # Some steps decoded more than one sequence (the 8 streams), and none more than 4.
    assert found["llm_engine_sequences_per_step_bucket:1.0"] < steps
    assert found["llm_engine_sequences_per_step_bucket:4.0"] == steps
    assert found["llm_engine_prompt_tokens_evaluated_total"] > 0


def test_aborted_streams_free_the_model(served: Served, client: OpenAI) -> None:
    body = {
        "model": CHAT_MODEL,
        "messages": ask("Write a very long story."),
        "max_tokens": 2000,
        "stream": True,
    }
    with httpx.Client(base_url=served.url, timeout=30) as http:
        for _ in range(10):
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first frame, then the client goes away
        started = time.monotonic()
        reply = client.chat.completions.create(model=CHAT_MODEL, messages=ask("Hi"), max_tokens=3)
        # Ten unaborted 2000-token stories would take minutes; aborted, they take nothing.
        assert time.monotonic() - started < 20
        assert reply.usage is not None and reply.usage.completion_tokens <= 3
        card = http.get(f"/v1/models/{CHAT_MODEL}").json()
        assert card["state"] == "loaded"


def test_the_readme_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:3000/v1" in example
    # The API's page and Getting started show the same example: this run covers them too.
    for page in ("docs/api/openai.md", "docs/getting-started.md"):
        assert f"```python\n{example}```" in (ROOT / page).read_text(), page
    exec(example.replace("http://127.0.0.1:3000", served.url), {})
    assert capsys.readouterr().out.strip()


def test_the_tools_page_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    page = (ROOT / "docs" / "api" / "tools.md").read_text()
    example = page.split("```python\n", 1)[1].split("```", 1)[0]
    exec(example.replace("http://127.0.0.1:3000", served.url), {})
    name, arguments = capsys.readouterr().out.strip().split(" ", 1)
    assert name == "get_weather" and "city" in arguments


def test_the_readme_tools_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tools and agents", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(example.replace("http://127.0.0.1:3000", served.url), {})
    # (The ollama call is "auto" and sampled: it may print an answer of several lines.)
    openai_line, anthropic_line = capsys.readouterr().out.strip().splitlines()[:2]
    assert "city" in json.loads(openai_line)
    assert anthropic_line.startswith("{'city':")


def test_the_release_smoke_test_passes_against_it(served: Served) -> None:
    """scripts/smoke_test.py, which the release runs after each deploy, against the real thing
    (its failures: tests/test_release_scripts.py)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "smoke_test.py"), served.url, "--wait", "30"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"smoke: {served.url}/readyz is ready" in result.stdout
    assert f"smoke: {CHAT_MODEL} answered '" in result.stdout


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
        },
    },
}


def test_a_required_tool_call_is_valid_even_from_a_base_model(client: OpenAI) -> None:
    """`tool_choice="required"` decodes under the calls' schema, so even the packaged base
    model calls a tool with arguments that parse and match it, streamed or not."""
    fields: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": ask("What is the weather in Paris?"),
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "required",
        "max_tokens": 200,
        "temperature": 0,
    }
    reply = client.chat.completions.create(**fields)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert calls
    schemas = {
        t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)
    }
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**fields, stream=True):
        delta = chunk.choices[0].delta
        for piece in delta.tool_calls or []:
            entry = streamed.setdefault(piece.index, {"name": "", "arguments": ""})
            if piece.id:
                assert piece.function is not None and piece.function.name
                entry["name"] = piece.function.name
            entry["arguments"] += (piece.function.arguments or "") if piece.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls
    ]


def test_a_named_tool_is_the_one_called(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[
            {"role": "user", "content": "What time is it in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
            {"role": "user", "content": "And the weather there?"},
        ],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    jsonschema.validate(
        json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"]
    )


def test_auto_answers_or_calls_and_either_is_well_formed(client: OpenAI) -> None:
    """Tools without a tool_choice mean "auto": the model either answers (content) or calls
    (valid tool_calls), never a mix and never malformed, streamed or not."""
    for question in ("What is the weather in Paris?", "Say hello."):
        reply = client.chat.completions.create(
            model=CHAT_MODEL,
            messages=ask(question),
            tools=[WEATHER_TOOL],
            max_tokens=120,
            temperature=0,
        )
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(
                    json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"]
                )
        else:
            assert isinstance(choice.message.content, str)
            assert choice.finish_reason in ("stop", "length")


def test_tool_requests_that_cannot_be_honoured_are_refused_by_name(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=ask("hi"),
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=4,
        )
    assert refused.value.body["param"] == "tool_choice.function.name"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "tool", "content": "12:00"}],  # type: ignore[list-item, typeddict-item]
            max_tokens=4,
        )
    assert "tool_call_id" in str(refused.value)


def test_the_responses_api_whole_streamed_and_continued(client: OpenAI) -> None:
    fields: dict[str, Any] = {
        "model": CHAT_MODEL,
        "input": "The three primary colours are",
        "instructions": "Be brief.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    whole = client.responses.create(**fields)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage is not None and 0 < whole.usage.output_tokens <= 12
    events = list(client.responses.create(**fields, stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # A response max_output_tokens cut short ends with response.incomplete, as OpenAI's does.
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == last.response.output_text == whole.output_text

    assert client.responses.retrieve(whole.id).output_text == whole.output_text
    follow = client.responses.create(
        model=CHAT_MODEL, input="And again?", previous_response_id=whole.id, max_output_tokens=4
    )
    assert follow.usage is not None and follow.usage.input_tokens > whole.usage.input_tokens
    client.responses.delete(whole.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=CHAT_MODEL, input="hi", previous_response_id=whole.id)


def test_the_responses_api_calls_a_function_tool(client: OpenAI) -> None:
    tool = {"type": "function", **WEATHER_TOOL["function"]}
    fields: dict[str, Any] = {
        "model": CHAT_MODEL,
        "input": "What is the weather in Paris?",
        "tools": [tool],
        "tool_choice": "required",
        "max_output_tokens": 120,
        "temperature": 0,
    }
    whole = client.responses.create(**fields)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert calls
    for call in calls:
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
    with client.responses.stream(**fields) as stream:
        final = stream.get_final_response()
    assert [(c.name, c.arguments) for c in final.output if c.type == "function_call"] == [
        (c.name, c.arguments) for c in calls
    ]
    answered = client.responses.create(
        model=CHAT_MODEL,
        previous_response_id=whole.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny"}],
        tools=[tool],
        max_output_tokens=40,
    )
    assert answered.status in ("completed", "incomplete")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=CHAT_MODEL, input="hi", tools=[{"type": "web_search"}])
    assert refused.value.body["param"].startswith("tools.0")  # type: ignore[index]


def test_parse_with_a_pydantic_function_tool(client: OpenAI) -> None:
    """`chat.completions.parse` with `openai.pydantic_function_tool`: strict tools whose calls
    come back parsed into the pydantic model."""
    from pydantic import BaseModel as PydanticModel

    class GetWeather(PydanticModel):
        city: str
        days: int

    reply = client.chat.completions.parse(
        model=CHAT_MODEL,
        messages=ask("What is the weather in Paris for the next two days?"),
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    calls = reply.choices[0].message.tool_calls or []
    assert calls
    parsed = calls[0].function.parsed_arguments
    assert isinstance(parsed, GetWeather)
