"""Reading a batching engine's stats (runtime/telemetry/batching.py) and turning its cumulative
counts into Prometheus increments (runtime/telemetry/engine_metrics.py). The surfaces that show
them are tested with their transports: tests/test_metrics.py, test_live.py, test_graphql.py,
test_http.py (/integrations/status) and test_dashboards.py."""

from __future__ import annotations

from typing import Any

import pytest

from runtime.telemetry.batching import BatchingStats, batching_stats, slot_fields
from runtime.telemetry.metrics import Metrics
from tests.scripted_engine import batching
from tests.test_metrics import Scrape

M = {"model": "m1", "provider": "local"}


def test_the_batching_keys_are_read_whole() -> None:
    stats = batching_stats({"engine": "llama_cpp", **batching()})
    assert stats == BatchingStats(
        parallel=8,
        slots_busy=3,
        slots_free=5,
        running=3,
        waiting=2,
        kv_cells_used=1200,
        kv_cells_total=4096,
        prompt_cache_hit_tokens=100,
        prompt_tokens_evaluated=40,
        steps=10,
        sequences_per_step={1: 4, 3: 6},
    )
    assert slot_fields(batching()) == {"slots_busy": 3, "slots_free": 5, "running": 3, "waiting": 2}


def test_an_engine_that_does_not_batch_has_none() -> None:
    assert batching_stats({"engine": "transformers", "queued": 1}) is None
    assert batching_stats(None) is None
    assert batching_stats("stats") is None
    assert slot_fields({"engine": "scripted"}) == dict.fromkeys(
        ("slots_busy", "slots_free", "running", "waiting")
    )


def test_a_runner_placed_model_is_read_from_the_runner_stats_unless_told_not_to() -> None:
    remote = {"placement": "runner", "engine": "llama_cpp", "runner": batching(slots_busy=7)}
    found = batching_stats(remote)
    assert found is not None and found.slots_busy == 7 and found.slots_free == 5
    assert batching_stats(remote, runner=False) is None
    assert batching_stats({"placement": "runner", "runner": {}}) is None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # slots_free left out: what parallel leaves free of the busy ones
        ({"slots_free": None}, {"slots_free": 5}),
        ({"slots_busy": "3", "slots_free": True}, {"slots_busy": 0, "slots_free": 8}),
        ({"running": -1, "kv_cells_total": 1.5}, {"running": 0, "kv_cells_total": 0}),
        (
            {"sequences_per_step": {"2": 5, "0": 1, "x": 3, "²": 1, 4: 2, "8": -1}},
            {"sequences_per_step": {2: 5, 4: 2}},
        ),
        ({"sequences_per_step": [1, 2]}, {"sequences_per_step": {}}),
    ],
)
def test_malformed_values_count_as_absent(
    changes: dict[str, Any], expected: dict[str, Any]
) -> None:
    stats = {k: v for k, v in batching(**changes).items() if v is not None}
    found = batching_stats(stats)
    assert found is not None
    for name, value in expected.items():
        assert getattr(found, name) == value, name
    assert batching_stats(batching(parallel="8")) is None
    assert batching_stats(batching(parallel=None)) is None


class Engine:
    """Stands for an engine object: the metrics tell a reload by the engine's identity."""


def test_cumulative_counts_become_increments_and_a_reload_starts_from_zero() -> None:
    metrics = Metrics()
    first = Engine()

    def read(engine: object, **changes: Any) -> Scrape:
        stats = batching_stats(batching(**changes))
        assert stats is not None
        metrics.engines.observe("m1", "local", engine, stats)
        return Scrape(metrics.exposition()[0].decode())

    m = read(first)
    assert m.value("llm_engine_slots_total", **M) == 8
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **M) == 100
    assert m.value("llm_engine_sequences_per_step_count", **M) == 10
    assert m.value("llm_engine_sequences_per_step_sum", **M) == 4 * 1 + 6 * 3
    # The same reading again adds nothing.
    m = read(first)
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **M) == 100
    assert m.value("llm_engine_prompt_tokens_evaluated_total", **M) == 40
    assert m.value("llm_engine_sequences_per_step_count", **M) == 10
    m = read(first, prompt_cache_hit_tokens=130, sequences_per_step={"1": 4, "3": 6, "16": 1})
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **M) == 130
    assert m.value("llm_engine_sequences_per_step_count", **M) == 11
    assert m.value("llm_engine_sequences_per_step_bucket", **M, le="8.0") == 10
    assert m.value("llm_engine_sequences_per_step_bucket", **M, le="16.0") == 11
    # A reloaded engine counts from zero, even with counts above the old engine's.
    m = read(Engine(), prompt_cache_hit_tokens=200, sequences_per_step={"1": 5})
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **M) == 130 + 200
    assert m.value("llm_engine_prompt_tokens_evaluated_total", **M) == 40 + 40
    assert m.value("llm_engine_sequences_per_step_count", **M) == 11 + 5


def test_an_unloaded_model_holds_no_slots() -> None:
    metrics = Metrics()
    stats = batching_stats(batching())
    assert stats is not None
    metrics.engines.gone("m2", "local")  # never seen: no series made up for it
    metrics.engines.observe("m1", "local", Engine(), stats)
    metrics.engines.gone("m1", "local")
    m = Scrape(metrics.exposition()[0].decode())
    assert not m.has("llm_engine_slots_total", model="m2")
    for gauge in ("sequences_running", "requests_waiting", "slots_busy", "kv_cells_used"):
        assert m.has(f"llm_engine_{gauge}", **M)
        assert m.value(f"llm_engine_{gauge}", **M) == 0
    assert m.value("llm_engine_prompt_cache_hit_tokens_total", **M) == 100  # counters stay
