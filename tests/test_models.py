"""ModelRouter: lookup, aliases, lazy loading, queue bounds, timeouts, idle unloading."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.events import BusEvent, EventBus
from runtime.models import ModelRouter, ModelState
from runtime.types import (
    EngineError,
    GenerationRequest,
    GenerationTimeout,
    ModelNotFound,
    QueueFull,
)
from tests.conftest import eventually
from tests.scripted_engine import ScriptedEngine


def router_with(
    fail_load: str | None = None, **model: Any
) -> tuple[ModelRouter, dict[str, ScriptedEngine], list[BusEvent]]:
    bus = EventBus()
    events: list[BusEvent] = []
    bus.subscribe("model.*", events.append)
    engines: dict[str, ScriptedEngine] = {}

    def factory(spec: ModelSpec) -> ScriptedEngine:
        engines[spec.config.id] = ScriptedEngine(spec)
        engines[spec.config.id].fail_load = fail_load
        return engines[spec.config.id]

    router = ModelRouter(bus, {"scripted": factory})
    config = ModelConfig(id="m1", source="x", **model)
    router.register(ModelSpec(config, Path("x"), "scripted"))
    return router, engines, events


async def collect(router: ModelRouter, **fields: Any) -> str:
    text = ""
    async for chunk in router.generate(GenerationRequest(model="m1", **fields)):
        text += chunk.text
    return text


async def test_models_load_on_first_use_and_answer_by_alias() -> None:
    router, engines, events = router_with(aliases=["first"])
    assert router.get("first").state is ModelState.unloaded
    assert await collect(router) == "ok"
    assert router.get("m1").state is ModelState.loaded
    assert [e.type for e in events] == ["model.loaded"]
    assert engines["m1"].loads == 1
    assert await collect(router) == "ok"
    assert engines["m1"].loads == 1


def test_unknown_models_suggest_close_matches() -> None:
    router, _, _ = router_with()
    with pytest.raises(ModelNotFound, match="did you mean m1"):
        router.get("m2")


async def test_preload_and_readiness() -> None:
    router, _, _ = router_with(preload=True)
    assert not router.ready
    await router.start()
    assert router.ready
    await router.stop()
    assert router.get("m1").state is ModelState.unloaded


async def test_a_load_failure_is_reported_and_retried_on_next_use() -> None:
    router, engines, events = router_with(fail_load="weights are corrupt")
    with pytest.raises(EngineError, match="weights are corrupt"):
        await collect(router)
    assert router.get("m1").state is ModelState.failed
    assert [e.type for e in events] == ["model.load_failed"]
    engines["m1"].fail_load = None  # a new engine is built on the next use
    with pytest.raises(EngineError):
        await collect(router)
    assert len(events) == 2


async def test_the_queue_is_bounded_and_frees_up() -> None:
    router, engines, _ = router_with(max_queue=1)
    await router.load("m1")
    engines["m1"].gate = asyncio.Event()
    first = router.generate(GenerationRequest(model="m1"))
    second = router.generate(GenerationRequest(model="m1"))
    pending = [asyncio.ensure_future(anext(first)), asyncio.ensure_future(anext(second))]
    await eventually(lambda: router.get("m1").in_flight == 2)
    with pytest.raises(QueueFull) as raised:
        await collect(router)
    assert raised.value.retry_after >= 1
    engines["m1"].gate.set()
    await asyncio.gather(*pending)
    for stream in (first, second):
        async for _ in stream:
            pass
    assert router.get("m1").in_flight == 0
    assert await collect(router) == "ok"


async def test_closing_a_stream_closes_the_engine_stream() -> None:
    router, engines, _ = router_with()
    await router.load("m1")
    engines["m1"].enqueue(["a", "b", "c"])
    stream = router.generate(GenerationRequest(model="m1"))
    assert (await anext(stream)).text == "a"
    await stream.aclose()  # type: ignore[attr-defined]
    assert engines["m1"].closed == 1
    assert router.get("m1").in_flight == 0


async def test_a_generation_past_its_timeout_is_stopped() -> None:
    router, engines, _ = router_with(timeout_s=0.05)
    await router.load("m1")
    engines["m1"].gate = asyncio.Event()  # never opens
    with pytest.raises(GenerationTimeout, match=r"longer than 0\.05s"):
        await collect(router)
    assert engines["m1"].closed == 1


async def test_idle_models_are_unloaded() -> None:
    router, _, events = router_with(idle_unload_s=0.1)
    await router.start()
    await collect(router)
    await eventually(lambda: router.get("m1").state is ModelState.unloaded, within=5)
    assert [e.type for e in events] == ["model.loaded", "model.unloaded"]
    assert await collect(router) == "ok"  # and loads again on demand
    await router.stop()


async def test_a_preloaded_model_unloaded_for_idleness_stays_ready() -> None:
    router, _, _ = router_with(preload=True, idle_unload_s=0.1)
    await router.start()
    assert router.ready
    await eventually(lambda: router.get("m1").state is ModelState.unloaded, within=5)
    assert router.ready  # the next request loads it again: still able to serve
    await router.unload("m1")
    assert router.ready
    broken = ScriptedEngine(router.get("m1").spec)
    broken.fail_load = "weights are corrupt"
    router.get("m1")._factory = lambda spec: broken  # the next load fails
    with pytest.raises(EngineError):
        await collect(router)
    assert not router.ready  # a reload that failed cannot serve
    await router.stop()


async def test_embeddings_and_tokenize_go_through_the_router() -> None:
    router, _, _ = router_with()
    result = await router.embed("m1", ["ab", "c"])
    assert result.vectors == [[2.0], [1.0]]
    assert router.tokenize("m1", "hi") == [104, 105]


async def test_fallbacks_that_do_not_exist_are_skipped() -> None:
    router, _, _ = router_with(fail_load="weights are corrupt", fallbacks=["gone"])
    # The model's own failure is what the client hears, not a 404 about its fallback.
    with pytest.raises(EngineError, match="weights are corrupt"):
        await collect(router)
