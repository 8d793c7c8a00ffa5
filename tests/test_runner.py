"""`serving.topology=split`: the line format, RemoteEngine against a RunnerHost in-process (the
packaged Gemma on llama.cpp standing in for a GPU engine), and a served process whose model
runs in the runner service that BentoML starts beside the API service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from runtime.app import Runtime
from runtime.errors import ConfigError
from runtime.runner_client import (
    RemoteEngine,
    RunnerHost,
    chunk_from_record,
    chunk_line,
    error_from_record,
    error_line,
)
from runtime.types import (
    Chunk,
    ContextLengthExceeded,
    EngineError,
    GenerationRequest,
    QueueFull,
    TokenLogprob,
    UnsupportedRequest,
    Usage,
)
from tests.served import Served

MakeRuntime = Callable[..., Runtime]
SPLIT = ("serving.topology=split", "serving.runner_engines=[llama_cpp]", "serving.runner_gpus=0")


def test_chunks_cross_the_line_intact() -> None:
    chunk = Chunk(
        index=1,
        text="héllo\n",
        logprobs=[TokenLogprob("hé", -0.5, [104, 195, 169], [("hé", -0.5), ("ha", -1.5)])],
        finish_reason="length",
        usage=Usage(7, 3),
    )
    line = chunk_line(chunk, {"tokens_generated": 3})
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["stats"] == {"tokens_generated": 3}
    assert chunk_from_record(record["chunk"]) == chunk


@pytest.mark.parametrize(
    "error",
    [
        ContextLengthExceeded(5000, 4096, 10),
        UnsupportedRequest("no json here", "response_format"),
        QueueFull("m1", 4, 7),
        EngineError("CUDA out of memory"),
    ],
)
def test_errors_cross_the_line_as_the_same_kind(error: Exception) -> None:
    back = error_from_record(json.loads(error_line(error))["error"])
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert vars(back) == vars(error)


@pytest.fixture
async def host(make_runtime: MakeRuntime, tmp_path: Path) -> AsyncIterator[RunnerHost]:
    runtime = make_runtime(
        "integrations=[custom_models]",
        f"integrations.custom_models.settings.cache_dir={tmp_path}",
        f"integrations.custom_models.settings.models_dir={tmp_path / 'none'}",
        "integrations.custom_models.settings.models.0.context_length=512",
        *SPLIT,
    )
    host = RunnerHost(runtime)
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def remote_text(engine: RemoteEngine, **fields: Any) -> tuple[str, Chunk]:
    text, last = "", Chunk()
    async for chunk in engine.generate(GenerationRequest(model=engine.id, **fields)):
        text, last = text + chunk.text, chunk
    return text, last


async def test_the_runner_hosts_only_its_engines_models(host: RunnerHost) -> None:
    assert list(host.models.models) == ["gemma-3-270m"]  # not the embeddings model
    assert host.models.ready


async def test_a_remote_engine_streams_what_the_runner_generates(host: RunnerHost) -> None:
    engine = RemoteEngine(host.models.get("gemma-3-270m").spec, client=host)
    await engine.load()
    remote, last = await remote_text(engine, prompt="The sea is", max_tokens=8, temperature=0)
    local = ""
    request = GenerationRequest(
        model="gemma-3-270m", prompt="The sea is", max_tokens=8, temperature=0
    )
    async for chunk in host.models.generate(request):
        local += chunk.text
    assert remote == local
    assert last.finish_reason == "length" and last.usage == Usage(4, 8)
    assert engine.stats()["runner"]["engine"] == "llama_cpp"


async def test_runner_errors_surface_as_engine_errors(host: RunnerHost) -> None:
    engine = RemoteEngine(host.models.get("gemma-3-270m").spec, client=host)
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 512"):
        await remote_text(engine, prompt="word " * 600)
    with pytest.raises(UnsupportedRequest) as unsupported:
        await remote_text(engine, prompt="x", logprobs=50)
    assert unsupported.value.param == "top_logprobs"
    stranger = RemoteEngine(host.models.get("gemma-3-270m").spec, client=host)
    stranger.id = "not-on-the-runner"
    with pytest.raises(EngineError, match="does not exist"):
        await stranger.load()


async def test_closing_a_remote_stream_stops_the_runner_job(host: RunnerHost) -> None:
    engine = RemoteEngine(host.models.get("gemma-3-270m").spec, client=host)
    local = host.models.get("gemma-3-270m")
    assert local.engine is not None
    before = local.engine.stats()["tokens_generated"]
    stream = engine.generate(GenerationRequest(model=engine.id, prompt="Once", max_tokens=400))
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    assert local.in_flight == 0
    assert local.engine.stats()["tokens_generated"] - before < 10


async def test_a_runner_that_cannot_be_reached_is_an_engine_error(host: RunnerHost) -> None:
    class Down:
        async def load_model(self, *, model: str) -> dict[str, Any]:
            raise ConnectionRefusedError("connection refused")

        async def generate(self, *, request: dict[str, Any]) -> AsyncIterator[str]:
            raise ConnectionRefusedError("connection refused")
            yield ""  # an async generator, like the BentoML proxy's stream

    engine = RemoteEngine(host.models.get("gemma-3-270m").spec, client=Down())  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="the runner service failed: ConnectionRefusedError"):
        await engine.load()
    with pytest.raises(EngineError, match="the runner service failed"):
        await remote_text(engine, prompt="x")


async def test_split_without_a_runner_refuses_to_start(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime(*SPLIT)
    with pytest.raises(ConfigError, match=r"serving\.topology"):
        await runtime.start()


@pytest.mark.slow
def test_served_split_topology_runs_the_model_in_the_runner_service(tmp_path: Path) -> None:
    served = Served.start_default_models(
        tmp_path,
        *SPLIT,
    )
    try:
        served.wait_for("/readyz", 200, timeout=180)
        client = OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            temperature=0,
        )
        assert reply.usage is not None and reply.usage.completion_tokens == 6
        streamed = client.completions.create(
            model="gemma-3-270m", prompt="Hello", max_tokens=5, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed if c.choices)
        too_long = httpx.post(
            served.url + "/v1/completions",
            json={"model": "gemma-3-270m", "prompt": "word " * 5000, "max_tokens": 4},
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        embedded = client.embeddings.create(model="all-minilm-l6-v2", input="stays in the API")
        assert len(embedded.data[0].embedding) == 384
        log = served.log.read_text()
        # The runner is its own BentoML service (and process), and generation happened there.
        assert "[service:tiffin-runner:1]" in log
        assert "path=/generate" in log and "path=/load_model" in log
    finally:
        assert served.stop() == 0
