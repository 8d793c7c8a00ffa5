"""The live view of a worker, in-process on the scripted engine: the metrics snapshot
(`GET /metrics/live`, `metrics.watch` every `interval`), the event stream (`events.watch`) and
the recent generation requests (`GET /admin/requests`). The WebSocket and GraphQL transports
expose the same handlers (tests/test_ws.py, tests/test_graphql.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from runtime.app import Runtime
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.events import BusEvent
from runtime.telemetry.live_stats import LiveStats, percentile
from runtime.transports.http import create_app
from runtime.types import Event, HandlerError
from tests.scripted_engine import ScriptedEngine, batching
from tests.test_openai_api import ScriptedEngines, chat

MakeRuntime = Callable[..., Runtime]


@pytest.fixture
async def runtime(make_runtime: MakeRuntime) -> Runtime:
    plugin = ScriptedEngines()
    runtime = make_runtime(builtins=[plugin])
    prices = {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}
    for model_id in ("m1", "m2"):
        config = ModelConfig(id=model_id, source="x", prices=prices)
        runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    await runtime.start()
    return runtime


@pytest.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        yield client


async def test_the_snapshot_counts_requests_tokens_and_latency(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    for model in ("m1", "m1", "m2"):
        assert (await http.post("/v1/chat/completions", json=chat(model=model))).is_success
    assert (await http.post("/v1/chat/completions", json=chat(model="nope"))).status_code == 404
    snap = (await http.get("/metrics/live")).json()
    assert snap["requests"]["total"] == 4 and snap["requests"]["errors_total"] == 1
    assert snap["requests"]["in_flight"] == 1  # this very request
    assert snap["latency_s"]["p50"] is not None and snap["latency_s"]["p99"] >= 0
    assert snap["tokens"]["completion_total"] == 3  # the scripted "ok": 1 token each
    assert snap["tokens"]["prompt_total"] == 9
    assert snap["cost_total"] == pytest.approx(12 / 1000)
    by_id = {m["id"]: m for m in snap["models"]}
    assert by_id["m1"]["requests"] == 2 and by_id["m2"]["requests"] == 1
    assert by_id["m1"]["state"] == "loaded" and by_id["m1"]["queue_depth"] == 0
    bad = await http.get("/metrics/live", params={"window": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"


async def test_recent_generation_requests_newest_first(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    first = await http.post("/v1/chat/completions", json=chat(model="m1"))
    second = await http.post("/v1/chat/completions", json=chat(model="m2", stream=True))
    await http.get("/v1/models")  # no model: not a generation request
    recent = (await http.get("/admin/requests", params={"limit": 5})).json()
    assert [r["model"] for r in recent] == ["m2", "m1"]
    assert recent[1]["id"] == first.headers["x-request-id"]
    assert recent[0]["id"] == second.headers["x-request-id"]
    newest = recent[0]
    assert newest["transport"] == "http" and newest["endpoint"] == "chat_completions"
    assert newest["status"] == 200 and newest["completion_tokens"] == 1
    assert newest["finish_reasons"] == ["stop"] and newest["ttft_s"] is not None
    assert newest["cost"] == pytest.approx(4 / 1000)
    assert (await http.get("/admin/requests", params={"limit": 1})).json()[0]["model"] == "m2"


async def test_events_stream_model_loads_and_filters_by_type(runtime: Runtime) -> None:
    subscribers = len(runtime.events._subscribers)
    stream = await runtime.dispatcher.dispatch(
        "events_watch", Event(query={"types": "model.*", "initial": "true"})
    )
    initial = [await anext(stream), await anext(stream)]
    assert {(e["type"], e["data"]["model"]) for e in initial} == {
        ("model.status", "m1"),
        ("model.status", "m2"),
    }
    await runtime.models.load("m1")
    loaded = await asyncio.wait_for(anext(stream), 5)
    assert loaded["type"] == "model.loaded" and loaded["data"]["model"] == "m1"
    await runtime.events.publish(BusEvent("integration.health_changed", "integrations"))
    await runtime.models.unload("m1")
    unloaded = await asyncio.wait_for(anext(stream), 5)
    assert unloaded["type"] == "model.unloaded"  # the integration event was filtered out
    assert len(runtime.events._subscribers) == subscribers + 1
    await stream.aclose()
    assert len(runtime.events._subscribers) == subscribers  # closed: unsubscribed


async def test_the_config_carried_between_workers_is_never_shown(runtime: Runtime) -> None:
    stream = await runtime.dispatcher.dispatch("events_watch", Event(query={"types": "*"}))
    secret = {"config": {"auth": {"keys": [{"name": "ops", "key": "k-secret"}]}}}
    await runtime.events.publish(BusEvent("reconfigure.share", "config", secret))
    await runtime.events.publish(BusEvent("config.applied", "config", {"hash": "abc"}))
    shown = await asyncio.wait_for(anext(stream), 5)
    assert shown["type"] == "config.applied"  # the share before it was skipped
    await stream.aclose()


async def test_metrics_frames_arrive_every_interval(runtime: Runtime) -> None:
    stream = await runtime.dispatcher.dispatch("metrics_watch", Event(query={"interval": "0.2"}))
    started = time.monotonic()
    frames = [await asyncio.wait_for(anext(stream), 5) for _ in range(4)]
    elapsed = time.monotonic() - started
    await stream.aclose()
    assert all("requests" in f and "models" in f for f in frames)
    assert 0.5 <= elapsed < 2.0  # three intervals of 0.2 s between four frames
    with pytest.raises(HandlerError) as refused:
        await runtime.dispatcher.dispatch("metrics_watch", Event(query={"interval": "0"}))
    assert refused.value.status == 400 and refused.value.param == "interval"


def test_percentiles_and_bounded_memory() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(101)], 99) == 99.0
    stats = LiveStats(capacity=10)
    for i in range(50):
        stats.request_started()
        stats.request_finished(str(i), "chat_completions", "http", "m", "local", 200, 0.1)
    assert len(stats.recent(100)) == 10 and stats.totals["requests"] == 50


async def test_the_snapshot_shows_a_batching_engines_slots(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    await runtime.models.load("m1")
    engine = runtime.models.get("m1").engine
    assert isinstance(engine, ScriptedEngine)
    engine.extra_stats = batching(slots_busy=6, slots_free=2, running=6, waiting=1)
    snap = (await http.get("/metrics/live")).json()
    by_id = {m["id"]: m for m in snap["models"]}
    assert {k: by_id["m1"][k] for k in ("slots_busy", "slots_free", "running", "waiting")} == {
        "slots_busy": 6,
        "slots_free": 2,
        "running": 6,
        "waiting": 1,
    }
    # m2 is not loaded, and its engine would not batch anyway: no slots to show.
    assert [by_id["m2"][k] for k in ("slots_busy", "slots_free", "running", "waiting")] == [
        None
    ] * 4
