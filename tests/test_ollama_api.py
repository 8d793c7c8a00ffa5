"""Tiffin speaks Ollama: the official `ollama` Python client against a served process with the
default models, plus the NDJSON framing and Ollama's error shape over raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import ollama
import pytest

from tests.conftest import ROOT
from tests.served import Served, serving_default_models

pytestmark = pytest.mark.slow
CHAT_MODEL = "gemma-3-270m"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_default_models(tmp_path_factory.mktemp("ollama")) as served:
        yield served


@pytest.fixture
def client(served: Served) -> ollama.Client:
    return ollama.Client(host=served.url)


def test_version_tags_and_ps(client: ollama.Client) -> None:
    names = {m.model for m in client.list().models}
    assert names == {CHAT_MODEL, "all-minilm-l6-v2"}
    assert {m.model for m in client.ps().models} == names  # both are preloaded
    gemma = next(m for m in client.list().models if m.model == CHAT_MODEL)
    assert gemma.size and gemma.size > 100_000_000
    assert gemma.details is not None and gemma.details.format == "gguf"


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    options = {"temperature": 0, "num_predict": 8}
    whole = client.chat(model=CHAT_MODEL, messages=messages, options=options)
    assert whole.done and whole.message.role == "assistant" and whole.message.content
    assert whole.eval_count is not None and 0 < whole.eval_count <= 8
    assert whole.prompt_eval_count
    parts = list(client.chat(model=CHAT_MODEL, messages=messages, options=options, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert all(not p.done for p in parts[:-1]) and len(parts) > 2
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_generate_templated_and_raw(client: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 6, "seed": 1}
    templated = client.generate(model=CHAT_MODEL, prompt="Hi", system="Be brief.", options=options)
    assert templated.done and templated.response
    raw = client.generate(model=CHAT_MODEL, prompt="The capital of France is", raw=True,
                          options=options)  # fmt: skip
    streamed = client.generate(
        model=CHAT_MODEL, prompt="The capital of France is", raw=True, options=options, stream=True
    )
    assert "".join(p.response for p in streamed) == raw.response


def test_json_format(client: ollama.Client) -> None:
    reply = client.chat(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Return a JSON object with the sky's color."}],
        format="json",
        options={"temperature": 0, "num_predict": 100, "repeat_penalty": 1.5},
    )
    assert isinstance(json.loads(reply.message.content or ""), dict)


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="all-minilm-l6-v2", input=["a cat", "a kitten"])
    assert [len(v) for v in result.embeddings] == [384, 384]


def test_errors_in_ollamas_shape(served: Served, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3:8b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    assert "does not exist" in missing.value.error
    bad = httpx.post(served.url + "/api/chat", json={"model": CHAT_MODEL, "messages": []})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    image = {"role": "user", "content": "What is this?", "images": ["aGk="]}
    for path, body in (
        ("/api/chat", {"model": CHAT_MODEL, "messages": [image]}),
        ("/api/generate", {"model": CHAT_MODEL, "prompt": "What is this?", "images": ["aGk="]}),
    ):
        refused = httpx.post(served.url + path, json=body)
        assert refused.status_code == 400
        assert refused.json() == {"error": f"{CHAT_MODEL} does not take images"}


def test_ndjson_framing(served: Served) -> None:
    body = {"model": CHAT_MODEL, "prompt": "Hello", "options": {"num_predict": 4}}
    with httpx.stream("POST", served.url + "/api/generate", json=body, timeout=60) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    assert lines[-1]["eval_count"] == 4 and lines[-1]["done_reason"] == "length"


def test_the_docs_example_runs(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = (ROOT / "docs" / "api" / "ollama.md").read_text().split("```python\n")[1:]
    [example] = [b.split("```", 1)[0] for b in blocks if "import ollama" in b]
    exec(example.replace("http://127.0.0.1:3000", served.url), {})
    assert capsys.readouterr().out.strip()


def test_chat_with_tools(client: ollama.Client) -> None:
    """Ollama's tool calling (always "auto"): the model answers or calls, and a call comes back
    in Ollama's shape, arguments as an object matching the tool's schema; earlier calls and
    tool results in the history are taken."""
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
            },
        },
    }
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
        {"role": "user", "content": "And in Oslo?"},
    ]
    options = {"temperature": 0, "num_predict": 120}
    for messages in (history[:1], history):
        whole = client.chat(model=CHAT_MODEL, messages=messages, tools=[weather], options=options)
        parts = list(
            client.chat(
                model=CHAT_MODEL, messages=messages, tools=[weather], options=options, stream=True
            )
        )
        assert whole.done and parts[-1].done
        calls = whole.message.tool_calls or []
        streamed = [c for p in parts for c in (p.message.tool_calls or [])]
        assert [c.function.name for c in calls] == [c.function.name for c in streamed]
        for call in calls:
            assert call.function.name == "get_weather"
            assert isinstance(call.function.arguments["city"], str)
        if not calls:
            assert whole.message.content == "".join(p.message.content or "" for p in parts)


def test_show_copy_delete_and_legacy_embeddings(served: Served, client: ollama.Client) -> None:
    shown = client.show(CHAT_MODEL)
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["llama_cpp.context_length"] == 4096
    assert shown.details is not None and shown.details.format == "gguf"
    assert shown.parameters is not None and "top_k 64" in shown.parameters
    assert client.show("all-minilm-l6-v2").capabilities == ["embedding"]

    client.copy(CHAT_MODEL, "my-gemma")
    reply = client.generate(model="my-gemma", prompt="Hi", options={"num_predict": 2})
    assert reply.done
    client.delete("my-gemma")
    with pytest.raises(ollama.ResponseError) as gone:
        client.show("my-gemma")
    assert gone.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as configured:
        client.delete(CHAT_MODEL)
    assert configured.value.status_code == 400 and "config" in configured.value.error

    legacy = client.embeddings(model="all-minilm-l6-v2", prompt="hello")
    assert len(legacy.embedding) == 384
    assert legacy.embedding == pytest.approx(
        client.embed(model="all-minilm-l6-v2", input="hello").embeddings[0], abs=1e-5
    )

    unknown = httpx.post(served.url + "/api/nowhere", json={})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
