"""The shared generation path (runtime/generation.py) on the scripted engine: the default cap
on generated tokens that every API gets when a client sets no max_tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from tests.test_openai_api import ScriptedEngines, chat

MakeRuntime = Callable[..., Runtime]


async def requests_made(make_runtime: MakeRuntime, *overrides: str) -> list[Any]:
    """What the engine was asked for: one request of each API shape, without max_tokens,
    then with the client's own max_tokens."""
    plugin = ScriptedEngines()
    runtime = make_runtime(*overrides, builtins=[plugin])
    await runtime.start()
    runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
    capped = ModelConfig(id="capped", source="x", defaults={"max_tokens": 64})
    runtime.models.register(ModelSpec(capped, Path("x"), "scripted"))
    ollama_chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        for path, body in [
            ("/v1/chat/completions", chat()),
            ("/api/chat", ollama_chat),
            ("/api/generate", {"model": "m1", "prompt": "hi", "stream": False}),
            ("/v1/chat/completions", chat(model="capped")),
            ("/api/chat", {**ollama_chat, "model": "capped"}),
            ("/v1/chat/completions", chat(max_tokens=5)),
            ("/api/chat", {**ollama_chat, "options": {"num_predict": 7}}),
        ]:
            assert (await http.post(path, json=body)).status_code == 200
    m1, capped_engine = plugin.built["m1"], plugin.built["capped"]
    return [*m1.requests[:3], *capped_engine.requests, *m1.requests[3:]]


async def test_every_api_caps_a_request_without_max_tokens(make_runtime: MakeRuntime) -> None:
    requests = await requests_made(make_runtime)
    caps = [(r.max_tokens, r.default_max_tokens) for r in requests]
    assert caps == [
        (None, 2048),  # OpenAI chat, Ollama chat and generate: the server's default
        (None, 2048),
        (None, 2048),
        (None, 64),  # a model's defaults.max_tokens comes first
        (None, 64),
        (5, 2048),  # the client's own max_tokens wins (the default only fills a gap)
        (7, 2048),
    ]


async def test_the_server_default_is_configurable(make_runtime: MakeRuntime) -> None:
    requests = await requests_made(make_runtime, "limits.default_max_tokens=100")
    assert [r.default_max_tokens for r in requests[:3]] == [100, 100, 100]
    uncapped = await requests_made(make_runtime, "limits.default_max_tokens=0")
    assert [r.default_max_tokens for r in uncapped[:3]] == [None, None, None]
