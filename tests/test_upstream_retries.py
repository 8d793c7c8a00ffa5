"""Retries before the first token and the circuit breaker of openai_compatible, with failures
injected at the HTTP layer (httpx.MockTransport in place of the upstream's connection, since a
real upstream cannot be made to fail on cue). The client code under test is the real one."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from omegaconf import DictConfig

from runtime.config_schema import IntegrationConfig
from runtime.integrations.openai_compatible import (
    DEFAULT_OPENAICOMPATIBLEINTEGRATION_CONFIG,
    OpenAICompatibleIntegration,
)
from runtime.integrations.openai_compatible.circuit import CircuitBreaker, CircuitState
from runtime.integrations.openai_compatible.openai_upstream import UpstreamEngine, request_body
from runtime.types import GenerationRequest, ProviderError

Reply = Callable[[httpx.Request], httpx.Response]


def stream_of(*texts: str) -> httpx.Response:
    events = [
        {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]} for t in texts
    ]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": len(texts)}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def upstream_with(replies: list[Reply | httpx.Response], **settings: object) -> UpstreamEngine:
    config = DEFAULT_OPENAICOMPATIBLEINTEGRATION_CONFIG
    merged = {**config.settings, "retry_backoff_s": 0.0, **settings}
    integration = OpenAICompatibleIntegration(
        IntegrationConfig(**{**vars(config), "settings": merged})
    )
    calls = iter(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        reply = next(calls)
        return reply(request) if callable(reply) else reply

    integration._client = httpx.AsyncClient(
        transport=httpx.MockTransport(handle), base_url="http://upstream.test/v1"
    )
    integration.upstream_models = ["m"]
    [spec] = integration.models()
    assert spec.factory is not None
    engine = spec.factory(spec)
    assert isinstance(engine, UpstreamEngine)
    return engine


async def text_of(engine: UpstreamEngine, request: GenerationRequest | None = None) -> str:
    request = request or GenerationRequest(
        model="openai_compatible/m", messages=[{"role": "user", "content": "x"}]
    )
    return "".join([c.text async for c in engine.generate(request)])


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_failures_before_the_first_token_are_retried() -> None:
    engine = upstream_with(
        [refuse, httpx.Response(503, json={"error": {"message": "busy"}}), stream_of("a", "b")]
    )
    assert await text_of(engine) == "ab"
    assert engine.upstream.circuit.state is CircuitState.closed
    assert engine.upstream.circuit.failures == 0  # a success resets the count


async def test_a_client_error_is_not_retried_and_keeps_its_fields() -> None:
    error = {
        "message": "bad temperature",
        "type": "invalid_request_error",
        "param": "temperature",
        "code": "x",
    }
    engine = upstream_with([httpx.Response(400, json={"error": error}), stream_of("never")])
    with pytest.raises(ProviderError) as raised:
        await text_of(engine)
    assert (raised.value.status, raised.value.param, raised.value.code) == (400, "temperature", "x")
    assert str(raised.value) == "bad temperature"
    assert engine.upstream.circuit.failures == 0


async def test_the_circuit_opens_after_repeated_failures_and_fails_fast() -> None:
    engine = upstream_with(
        [refuse] * 4, max_retries=1, circuit={"failure_threshold": 3, "reset_after_s": 60}
    )
    with pytest.raises(ProviderError, match="cannot be reached"):
        await text_of(engine)  # two attempts, two failures
    with pytest.raises(ProviderError) as raised:
        await text_of(engine)  # the third failure opens the circuit; no fourth call is made
    assert raised.value.code == "upstream_unavailable" and "circuit open" in str(raised.value)
    assert engine.upstream.circuit.state is CircuitState.open


def test_the_breaker_half_opens_after_its_wait_and_closes_on_success() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, reset_after_s=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow() and breaker.retry_in == 10
    now[0] = 10.0
    assert breaker.allow() and breaker.state is CircuitState.half_open
    breaker.failure()  # the trial failed: open again, for another full wait
    assert not breaker.allow() and breaker.retry_in == 10
    now[0] = 20.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.closed and breaker.allow()


def test_config_composes(compose_test: Callable[..., DictConfig]) -> None:
    cfg = compose_test("integrations=[openai_compatible]")
    assert cfg.integrations.openai_compatible.settings.circuit.failure_threshold == 5


def test_seed_zero_is_sent_and_tools_are_refused() -> None:
    request = GenerationRequest(model="m", prompt="x", seed=0, max_tokens=0)
    body = request_body(request, "m")
    assert body["seed"] == 0 and body["max_tokens"] == 0


async def test_tool_requests_reach_the_upstream_with_their_tools() -> None:
    """Tools are the upstream's to honour (they were refused before Tiffin could carry calls;
    tests/test_openai_upstream.py checks the calls that come back)."""
    sent: list[dict[str, object]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return stream_of("ok")

    engine = upstream_with([answer])
    tool = {"type": "function", "function": {"name": "f"}}
    request = GenerationRequest(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert await text_of(engine, request) == "ok"
    assert (sent[0]["tools"], sent[0]["tool_choice"], sent[0]["parallel_tool_calls"]) == (
        [tool],
        "required",
        False,
    )


async def test_a_half_open_trial_that_the_upstream_refuses_closes_the_circuit() -> None:
    bad = httpx.Response(400, json={"error": {"message": "bad request"}})
    engine = upstream_with(
        [refuse, bad, stream_of("ok")],
        max_retries=0,
        circuit={"failure_threshold": 1, "reset_after_s": 0},
    )
    with pytest.raises(ProviderError, match="cannot be reached"):
        await text_of(engine)  # opens the circuit
    with pytest.raises(ProviderError, match="bad request"):
        await text_of(engine)  # the half-open trial: the upstream answered, so it closes
    assert engine.upstream.circuit.state is CircuitState.closed
    assert await text_of(engine) == "ok"
