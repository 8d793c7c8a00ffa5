"""The redis integration on a real redis-server: two Runtimes in one test process stand for two
workers. Events cross between their buses once and never echo; a key's rate limit is one count
across both; Redis stopped mid-run degrades both to per-process behaviour without failing or
slowing a request, and Redis restarted on the same port brings the bridge and shared counts back.
The password in REDIS_URL never shows in status, health or logs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import structlog
from omegaconf import DictConfig
from websockets.asyncio.client import connect

import handlers
from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.events import BusEvent
from runtime.integrations.base import IntegrationStatus
from runtime.integrations.redis import RedisIntegration
from runtime.integrations.redis.redis_rates import RedisRateStore
from runtime.reconfigure import config_hash
from runtime.transports.http import create_app
from tests.conftest import eventually
from tests.real_redis import PASSWORD, RedisServer, running_redis
from tests.served import Served
from tests.test_alerts import NOTIFICATION, WEBHOOK
from tests.test_auth import ADMIN, APP, KEYS, FakeClock
from tests.test_openai_api import ScriptedEngines

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def redis_overrides(url: str) -> list[str]:
    """The redis integration on `url`, with intervals short enough for a test to watch."""
    return [
        "+integrations=[redis]",
        f"integrations.redis.settings.url='{url}'",
        "integrations.redis.health_check_interval=0.1",
        "integrations.redis.settings.block_s=0.2",
        "integrations.redis.settings.reconnect_interval_s=0.1",
        "integrations.redis.retry_config.initial_delay=0.1",
    ]


Workers = Callable[..., "asyncio.Future[list[Runtime]]"]


@pytest.fixture
async def workers(
    compose_test: Callable[..., DictConfig], redis_server: RedisServer
) -> AsyncIterator[Callable[..., Any]]:
    """Start `count` Runtimes on one Redis (real sleeps: the watch loops run as in service)."""
    async with AsyncExitStack() as stack:

        async def start(*overrides: str, count: int = 2) -> list[Runtime]:
            started = []
            for _ in range(count):
                runtime = Runtime(
                    compose_test(*redis_overrides(redis_server.url), *overrides),
                    builtins=[*handlers.builtin_plugins(), ScriptedEngines()],
                )
                stack.push_async_callback(runtime.stop)
                await runtime.start()
                runtime.models.register(
                    ModelSpec(ModelConfig(id="m1", source="x", timeout_s=5), Path("x"), "scripted")
                )
                started.append(runtime)
            return started

        yield start


def redis_of(runtime: Runtime) -> RedisIntegration:
    integration = runtime.integrations.integrations["redis"]
    assert isinstance(integration, RedisIntegration)
    return integration


def client(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")


def collect(runtime: Runtime, pattern: str = "*") -> list[BusEvent]:
    seen: list[BusEvent] = []
    runtime.events.subscribe(pattern, seen.append)
    return seen


async def test_events_cross_between_workers_once_without_echo(workers: Any) -> None:
    a, b = await workers()
    redis_a, redis_b = redis_of(a), redis_of(b)
    assert redis_a.status is IntegrationStatus.active and redis_a.connected
    assert redis_a.bridge.origin != redis_b.bridge.origin
    seen_a, seen_b = collect(a), collect(b)

    await a.events.publish(BusEvent("model.loaded", "models", {"model": "m1", "seconds": 0.5}))
    await a.events.publish(BusEvent("request.finished", "dispatch", {"id": "r1"}))  # stays
    async with client(a) as http:  # an Alertmanager notification reaching worker A
        assert (await http.post(WEBHOOK, json=NOTIFICATION)).status_code == 200
    await b.events.publish(BusEvent("ollama.pull", "ollama", {"model": "x", "completed": 5}))

    crossed = ("model.loaded", "alert.firing", "alert.resolved")
    await eventually(lambda: {e.type for e in seen_b if e.remote} >= set(crossed), within=5)
    await eventually(lambda: any(e.type == "ollama.pull" and e.remote for e in seen_a), within=5)
    await asyncio.sleep(0.5)  # give any echo or loop the time to show

    remote_b = [e for e in seen_b if e.remote]
    assert sorted(e.type for e in remote_b) == sorted(crossed)  # each once, nothing else
    loaded = next(e for e in remote_b if e.type == "model.loaded")
    assert loaded.origin == redis_a.bridge.origin and loaded.source == "models"
    assert dict(loaded.data) == {"model": "m1", "seconds": 0.5}
    firing = next(e for e in remote_b if e.type == "alert.firing")
    assert firing.data["alertname"] == "LLMHighGPUMemory"
    # No echo: A saw its own events once (local) and from the stream only B's: its pull, and
    # B's own start (integration.*, which came after A's bridge was listening).
    from_b = [e for e in seen_a if e.remote]
    assert [e.type for e in from_b if not e.type.startswith("integration.")] == ["ollama.pull"]
    assert {e.origin for e in from_b} == {redis_b.bridge.origin}
    assert [e.type for e in seen_a].count("model.loaded") == 1
    assert [e.type for e in seen_b].count("ollama.pull") == 1
    assert redis_b.bridge.received == 3  # A's three, not B's own (A started before B listened)
    # B republished A's events locally and sent none of them back out: the stream holds each
    # worker's start (integration.started, .health_changed), A's three and B's pull.
    assert redis_b.bridge.sent == 3 and redis_a.bridge.sent == 5
    health = await redis_a.health_check()
    assert health.healthy and health.data["stream_length"] == 8
    assert "tiffin:events (8 entries)" in health.detail
    # Another worker's model load is not this worker's metric (each worker exports its own).
    labels = {"model": "m1", "provider": "", "status": "success"}
    assert a.metrics.registry.get_sample_value("llm_model_loads_total", labels) == 1
    assert b.metrics.registry.get_sample_value("llm_model_loads_total", labels) is None


async def test_rate_limit_is_one_count_across_workers(workers: Any) -> None:
    a, b = await workers(KEYS, "auth.limits.requests_per_minute=3")
    clock = FakeClock(1_000_040.0)  # 20 s into a window, for both workers
    a.auth.limiter.clock = b.auth.limiter.clock = clock
    assert isinstance(a.auth.limiter.store, RedisRateStore)
    async with client(a) as http_a, client(b) as http_b:
        assert (await http_a.get("/v1/models", headers=APP)).status_code == 200
        assert (await http_b.get("/v1/models", headers=APP)).status_code == 200
        assert (await http_a.get("/v1/models", headers=APP)).status_code == 200
        limited = await http_b.get("/v1/models", headers=APP)  # B's second, the key's fourth
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "40"
        assert limited.json()["error"]["code"] == "requests_per_minute"
        assert (await http_a.get("/v1/models", headers=APP)).status_code == 429
        clock.now += 40  # the next window: both admit again
        assert (await http_b.get("/v1/models", headers=APP)).status_code == 200
    assert redis_of(a).rate_store.fallback_adds == 0


async def test_an_error_redis_answers_falls_back_for_that_call_only(
    workers: Any, redis_server: RedisServer
) -> None:
    (a,) = await workers(KEYS, "auth.limits.requests_per_minute=5", count=1)
    a.auth.limiter.clock = FakeClock(1_000_040.0)  # the window that starts at 1_000_020
    key = "tiffin:rate:app:requests:1000020"
    with redis.Redis(port=redis_server.port, password=PASSWORD) as direct:
        direct.set(key, "not a number")  # INCRBY answers an error
        async with client(a) as http:
            assert (await http.get("/v1/models", headers=APP)).status_code == 200
            store = redis_of(a).rate_store
            assert store.fallback_adds == 1 and redis_of(a).connected  # Redis is still up
            assert redis_of(a).link.errors == 1
            direct.delete(key)
            assert (await http.get("/v1/models", headers=APP)).status_code == 200
            assert store.shared_adds == 1 and direct.get(key) == b"1"


async def test_redis_outage_degrades_to_each_worker_then_recovers(
    workers: Any, redis_server: RedisServer
) -> None:
    with structlog.testing.capture_logs() as logs:
        a, b = await workers(KEYS, "auth.limits.requests_per_minute=2")
        redis_a, redis_b = redis_of(a), redis_of(b)
        seen_a, seen_b = collect(a, "model.*"), collect(b, "model.*")

        redis_server.stop()
        await eventually(lambda: not redis_a.connected and not redis_b.connected, within=5)
        await eventually(
            lambda: redis_a.status is IntegrationStatus.error and redis_a.last_error, within=5
        )
        async with client(a) as http_a:
            started = time.perf_counter()
            # Counted per process now: A admits its two, whatever B does.
            assert (await http_a.get("/v1/models", headers=APP)).status_code == 200
            assert (await http_a.get("/v1/models", headers=APP)).status_code == 200
            assert (await http_a.get("/v1/models", headers=APP)).status_code == 429
            assert time.perf_counter() - started < 2  # nothing waited on the dead Redis
            status = (await http_a.get("/integrations/redis/status", headers=ADMIN)).json()
        assert status["status"] == "error" and status["connected"] is False
        assert status["rate_limits"]["store"] == "memory (redis down)"
        assert redis_a.rate_store.fallback_adds >= 3
        await a.events.publish(BusEvent("model.unloaded", "models", {"model": "m1"}))
        assert [e.type for e in seen_a] == ["model.unloaded"]  # local events still flow

        redis_server.start()  # same port, empty: no persistence
        await eventually(lambda: redis_a.connected and redis_b.connected, within=10)
        await eventually(lambda: redis_a.status is IntegrationStatus.active, within=5)
        await a.events.publish(BusEvent("model.loaded", "models", {"model": "m1"}))
        await eventually(lambda: [e.type for e in seen_b] == ["model.loaded"], within=5)
        assert seen_b[0].remote  # the unload during the outage never crossed, this one did
        shared = redis_a.rate_store.shared_adds
        async with client(b) as http_b:
            assert (await http_b.get("/v1/models", headers=APP)).status_code == 200
        assert redis_b.rate_store.shared_adds == 1 and redis_a.rate_store.shared_adds == shared

    down = [e for e in logs if str(e.get("event", "")).startswith("redis unreachable")]
    back = [e for e in logs if str(e.get("event", "")).startswith("redis reachable again")]
    assert len(down) == 2 and len(back) == 2  # once per transition, per worker
    assert PASSWORD not in repr(logs)
    described = repr([redis_a.describe(), redis_a.last_health, status])
    assert PASSWORD not in described and ":***@127.0.0.1" in described


async def test_redis_down_at_start_serves_then_joins_when_it_comes(
    workers: Any, redis_server: RedisServer
) -> None:
    redis_server.stop()
    a, b = await workers(KEYS, "auth.limits.requests_per_minute=1")
    redis_a = redis_of(a)
    assert redis_a.status is IntegrationStatus.error and not redis_a.connected
    assert a.ready  # optional: the service is up without it
    async with client(a) as http:
        assert (await http.get("/v1/models", headers=APP)).status_code == 200
    seen_b = collect(b, "model.*")

    redis_server.start()  # the manager's background retries bring it up
    await eventually(lambda: redis_a.connected and redis_of(b).connected, within=10)
    await eventually(lambda: redis_a.status is IntegrationStatus.active, within=5)
    await a.events.publish(BusEvent("model.loaded", "models", {"model": "m1"}))
    await eventually(lambda: [e.type for e in seen_b if e.remote] == ["model.loaded"], within=5)
    b.auth.limiter.clock = FakeClock(1_000_040.0)  # no window ends between the two
    async with client(b) as http:  # counted in Redis now: B's first, the window's first
        assert (await http.get("/v1/models", headers=APP)).status_code == 200
        assert (await http.get("/v1/models", headers=APP)).status_code == 429


async def test_a_hung_redis_costs_one_short_timeout_then_nothing(
    workers: Any, redis_server: RedisServer
) -> None:
    (a,) = await workers(KEYS, "auth.limits.requests_per_minute=100", count=1)
    redis_a = redis_of(a)
    timeout_s = redis_a.link.socket_timeout_s
    redis_server.pause()  # accepts connections, answers nothing
    try:
        async with client(a) as http:
            for _ in range(5):
                started = time.perf_counter()
                assert (await http.get("/v1/models", headers=APP)).status_code == 200
                # At most one socket timeout (the call that finds Redis gone), then none.
                assert time.perf_counter() - started < timeout_s + 1
            assert not redis_a.connected
            started = time.perf_counter()
            for _ in range(5):
                assert (await http.get("/v1/models", headers=APP)).status_code == 200
            assert time.perf_counter() - started < 1
        await eventually(lambda: redis_a.status is IntegrationStatus.error, within=5)
        await a.events.publish(BusEvent("model.loaded", "models", {"model": "m1"}))
    finally:
        redis_server.resume()
    await eventually(lambda: redis_a.connected, within=5)
    await eventually(lambda: redis_a.status is IntegrationStatus.active, within=5)


async def test_stop_is_prompt_even_when_redis_py_loses_the_cancel(
    compose_test: Callable[..., DictConfig],
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Python 3.11, redis-py loses a cancel that lands as a command finishes sending (its
    asyncio.wait_for, CPython gh-86296). The watch loop then read on, and stop waited out the
    manager's 30 s shutdown limit, past compose's stop_grace_period. The loss is injected (the
    read returns as if never cancelled), so the test does not hang on that timing."""
    runtime = Runtime(
        compose_test(*redis_overrides(redis_server.url)), builtins=handlers.builtin_plugins()
    )
    await runtime.start()
    integration = redis_of(runtime)
    reads, watch = integration.link.reads, integration._watch
    real_xread, calls, lost = reads.xread, [], []

    async def xread(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        try:
            return await real_xread(*args, **kwargs)
        except asyncio.CancelledError:
            if lost:
                raise
            lost.append(1)
            return None

    monkeypatch.setattr(reads, "xread", xread)
    await eventually(lambda: calls, within=10)  # the watch loop is in a (blocking) read
    started = time.monotonic()
    await asyncio.wait_for(runtime.stop(), timeout=60)
    assert time.monotonic() - started < 10  # a hang guard: it took the full 30 s
    assert lost and watch is not None and watch.done()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("tiffin:redis")]


# --- served: two BentoML workers ------------------------------------------------------------------


def one_alert(fingerprint: str) -> dict[str, Any]:
    """An Alertmanager notification holding one firing alert, told apart by its fingerprint."""
    return {**NOTIFICATION, "alerts": [{**NOTIFICATION["alerts"][0], "fingerprint": fingerprint}]}


class Feeds:
    """Sockets on /ws/models (alerts only), each keeping the alerts it got by fingerprint."""

    def __init__(self, sockets: list[Any]) -> None:
        self.sockets = sockets
        self.seen: list[dict[str, dict[str, Any]]] = [{} for _ in sockets]
        self.readers = [asyncio.ensure_future(self._read(i)) for i in range(len(sockets))]

    async def _read(self, index: int) -> None:
        async for frame in self.sockets[index]:
            event = json.loads(frame)
            fingerprint = event["data"]["fingerprint"]
            assert fingerprint not in self.seen[index], f"socket {index}: {fingerprint} twice"
            self.seen[index][fingerprint] = event

    def got(self, fingerprints: list[str]) -> bool:
        return all(set(fingerprints) <= set(seen) for seen in self.seen)

    def frames(self, fingerprints: list[str]) -> list[dict[str, Any]]:
        return [seen[f] for seen in self.seen for f in fingerprints if f in seen]


async def both_workers_up(url: str, within: float = 60) -> set[str]:
    """Ask (on new connections) until two workers have answered with their bridge's origin."""
    origins: set[str] = set()
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=url, headers={"connection": "close"}) as http:
        while len(origins) < 2:
            assert time.monotonic() < deadline, f"one worker only: {origins}"
            answers = await asyncio.gather(
                *(http.get("/integrations/redis/status") for _ in range(4))
            )
            origins |= {a.json()["bridge"]["origin"] for a in answers if a.status_code == 200}
    return origins


async def test_alert_on_one_worker_reaches_feeds_on_every_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """`python -m runtime server.workers=2 integrations=redis`: an Alertmanager webhook that
    reaches either worker shows up, once, on every /ws/models socket, whichever worker holds it."""
    served = Served.start(
        tmp_path,
        "env=test",
        "integrations=[redis]",
        f"integrations.redis.settings.url='{redis_server.url}'",
        "server.workers=2",
    )
    try:
        served.wait_for("/readyz", 200)
        await both_workers_up(served.url)
        ws_url = served.url.replace("http://", "ws://") + "/ws/models?types=alert.*"
        async with AsyncExitStack() as stack, httpx.AsyncClient(base_url=served.url) as http:
            sockets = [
                await stack.enter_async_context(connect(ws_url, open_timeout=10)) for _ in range(6)
            ]
            feeds = Feeds(sockets)
            stack.callback(lambda: [reader.cancel() for reader in feeds.readers])

            async def post(fingerprints: list[str]) -> None:
                # A new connection each, sent together: they spread over the workers.
                close = {"connection": "close"}
                posts = [http.post(WEBHOOK, json=one_alert(f), headers=close) for f in fingerprints]
                assert all(r.status_code == 200 for r in await asyncio.gather(*posts))

            # Every socket subscribed and the bridges running: one alert reached them all.
            await post(["warm-up"])
            await eventually(lambda: feeds.got(["warm-up"]), within=10)
            sent: list[str] = []
            for batch in range(20):  # until sockets on both workers got alerts
                fingerprints = [f"probe-{batch}-{n}" for n in range(4)]
                await post(fingerprints)
                sent += fingerprints
                await eventually(lambda probes=fingerprints: feeds.got(probes), within=10)
                origins = {str(e.get("origin", "")) for e in feeds.frames(sent)}
                if "" in origins and len(origins) > 1:  # sockets on the webhook's worker and not
                    break
            assert not any(reader.done() for reader in feeds.readers)  # none failed
        # Some sockets got alerts from their own worker, others from the other one's (origin).
        assert "" in origins and len(origins) > 1, f"sockets on one worker only: {origins}"
        assert all(len(seen) == len(sent) + 1 for seen in feeds.seen)  # each alert once
    finally:
        served.stop()
    assert PASSWORD not in served.log.read_text(errors="replace")


async def test_a_config_applied_on_one_worker_is_applied_on_every_worker(
    workers: Any, compose_test: Callable[..., DictConfig], redis_server: RedisServer
) -> None:
    a, b = await workers()
    origin_b = redis_of(b).bridge.origin
    cfg = compose_test(*redis_overrides(redis_server.url), "limits.max_tokens=64")
    answer = await a.reconfigure.apply(cfg)
    assert answer["applied"] and answer["changes"][0]["kind"] == "limits"
    await eventually(lambda: b.settings.limits.max_tokens == 64, within=10)
    assert config_hash(b.cfg) == config_hash(a.cfg) == answer["hash"]
    assert b.request_limits.limits.max_tokens == 64
    # B's apply (not shared again) reaches A with B's hash: A reports every worker's.
    await eventually(lambda: origin_b in a.reconfigure.peers, within=10)
    async with client(a) as http:
        shown = (await http.get("/admin/config")).json()
    assert shown["peers"][origin_b]["hash"] == shown["hash"] == answer["hash"]
    assert shown["peers"][origin_b]["result"] == "applied"
    await asyncio.sleep(0.5)
    assert a.metrics.config_applies.labels("applied")._value.get() == 1  # no echo back to A
