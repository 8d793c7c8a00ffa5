"""Prometheus families of the batching engines (`llm_engine_*`): slots, sequences running and
waiting, KV cells, the prompt cache and the sequences decoded per step, per model.

The numbers come from each engine's `stats()` (batching.py), read by the metrics plugin every
`telemetry.sample_interval_s`. They are real Gauge, Counter and Histogram objects rather than a
scrape-time collector because prometheus_client's multiprocess mode adds up only what each
worker wrote to its files: a custom collector would show one worker's engines. Each worker holds
its own engines, so the gauges are `livesum`. An engine's counts are cumulative since it loaded;
`observe` turns them into increments, and starts again from zero when the model was reloaded.

Only engines in this process are read: a runner-placed model's stats reach each API worker as a
copy taken at the end of its generations, which every worker would add again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.telemetry.batching import BatchingStats

SEQUENCES_PER_STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ENGINE_LABELS = ("model", "provider")


@dataclass
class _Seen:
    """What was counted of one model's engine so far."""

    engine: Callable[[], object | None]  # the engine those counts are from
    prompt_cache_hit_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    sequences_per_step: dict[int, int] = field(default_factory=dict)


class EngineMetrics:
    """The `llm_engine_*` families, on the Runtime's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(name, text, ENGINE_LABELS, registry=r, multiprocess_mode="livesum")

        self.running = gauge(
            "llm_engine_sequences_running", "Sequences a batching engine is prefilling or decoding."
        )
        self.waiting = gauge(
            "llm_engine_requests_waiting", "Requests waiting inside a batching engine for a slot."
        )
        self.slots_busy = gauge("llm_engine_slots_busy", "Slots of a batching engine in use.")
        self.slots_total = gauge("llm_engine_slots_total", "Slots of a batching engine in all.")
        self.kv_used = gauge("llm_engine_kv_cells_used", "KV cache cells in use.")
        self.kv_total = gauge("llm_engine_kv_cells_total", "KV cache cells in all.")
        self.cache_hits = Counter(
            "llm_engine_prompt_cache_hit_tokens",
            "Prompt tokens served from the prompt cache, not evaluated again.",
            ENGINE_LABELS,
            registry=r,
        )
        self.evaluated = Counter(
            "llm_engine_prompt_tokens_evaluated",
            "Prompt tokens a batching engine evaluated.",
            ENGINE_LABELS,
            registry=r,
        )
        self.sequences_per_step = Histogram(
            "llm_engine_sequences_per_step",
            "Sequences decoded together in one decode step (one observation per step).",
            ENGINE_LABELS,
            buckets=SEQUENCES_PER_STEP_BUCKETS,
            registry=r,
        )
        self._seen: dict[tuple[str, str], _Seen] = {}

    def observe(self, model: str, provider: str, engine: object, stats: BatchingStats) -> None:
        """Set the gauges of `model` from `stats`, read from `engine`, and count what its
        cumulative numbers grew by since the last reading."""
        labels = (model, provider)
        self.running.labels(*labels).set(stats.running)
        self.waiting.labels(*labels).set(stats.waiting)
        self.slots_busy.labels(*labels).set(stats.slots_busy)
        self.slots_total.labels(*labels).set(stats.parallel)
        self.kv_used.labels(*labels).set(stats.kv_cells_used)
        self.kv_total.labels(*labels).set(stats.kv_cells_total)

        seen = self._seen.get(labels)
        if seen is None or seen.engine() is not engine or _went_back(seen, stats):
            seen = _Seen(_reference(engine))  # a new engine (a reload) counts from zero
            self._seen[labels] = seen
        hits = self.cache_hits.labels(*labels)
        hits.inc(stats.prompt_cache_hit_tokens - seen.prompt_cache_hit_tokens)
        evaluated = self.evaluated.labels(*labels)
        evaluated.inc(stats.prompt_tokens_evaluated - seen.prompt_tokens_evaluated)
        histogram = self.sequences_per_step.labels(*labels)
        for size, steps in sorted(stats.sequences_per_step.items()):
            for _ in range(steps - seen.sequences_per_step.get(size, 0)):
                histogram.observe(size)
        seen.prompt_cache_hit_tokens = stats.prompt_cache_hit_tokens
        seen.prompt_tokens_evaluated = stats.prompt_tokens_evaluated
        seen.sequences_per_step = dict(stats.sequences_per_step)

    def gone(self, model: str, provider: str) -> None:
        """`model` has no batching engine now (unloaded): it holds no slots and no sequences."""
        labels = (model, provider)
        if self._seen.pop(labels, None) is None:
            return
        for gauge in (
            self.running,
            self.waiting,
            self.slots_busy,
            self.slots_total,
            self.kv_used,
            self.kv_total,
        ):
            gauge.labels(*labels).set(0)


def _went_back(seen: _Seen, stats: BatchingStats) -> bool:
    """A cumulative count below the last reading: the engine started again from zero."""
    return (
        stats.prompt_cache_hit_tokens < seen.prompt_cache_hit_tokens
        or stats.prompt_tokens_evaluated < seen.prompt_tokens_evaluated
        or any(
            stats.sequences_per_step.get(size, 0) < steps
            for size, steps in seen.sequences_per_step.items()
        )
    )


def _reference(engine: object) -> Callable[[], object | None]:
    """A weak reference where the engine allows one: an id could be reused by a reloaded one."""
    try:
        return weakref.ref(engine)
    except TypeError:
        return lambda: engine
