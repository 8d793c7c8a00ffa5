"""The continuous-batching part of an engine's `stats()`, read the same way by every surface that
shows it (`/metrics`, `/metrics/live`, GraphQL, `/integrations/status`).

A batching engine (one scheduler decoding many sequences together, in "slots") reports:
`parallel`, `slots_busy`, `slots_free`, `running`, `waiting`, `kv_cells_used`, `kv_cells_total`,
and the cumulative `prompt_cache_hit_tokens`, `prompt_tokens_evaluated`, `steps` and
`sequences_per_step` (`{"<sequences in one step>": <steps>}`). An engine that does not batch
lacks them, and a model in the runner service (`serving.topology=split`) has the runner's stats
nested under `runner`: `batching_stats` reads either shape and answers None when there is
nothing to read. A malformed value counts as absent rather than failing a status page.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchingStats:
    """One reading of a batching engine; the last four fields only ever grow (until reload)."""

    parallel: int
    slots_busy: int
    slots_free: int
    running: int
    waiting: int
    kv_cells_used: int
    kv_cells_total: int
    prompt_cache_hit_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    steps: int = 0
    sequences_per_step: Mapping[int, int] = field(default_factory=dict)

    def slots(self) -> dict[str, int]:
        """What the status views show of it."""
        return {
            "slots_busy": self.slots_busy,
            "slots_free": self.slots_free,
            "running": self.running,
            "waiting": self.waiting,
        }


# The live views' per-model fields, None where the engine does not batch.
SLOT_FIELDS = ("slots_busy", "slots_free", "running", "waiting")


def batching_stats(stats: Any, *, runner: bool = True) -> BatchingStats | None:
    """The batching part of `stats` (an engine's `stats()`), or None when it has none.
    With `runner`, a runner-placed model's nested `runner` stats are read too."""
    if not isinstance(stats, Mapping):
        return None
    if "parallel" not in stats and runner:
        return batching_stats(stats.get("runner"), runner=False)
    parallel = _count(stats.get("parallel"))
    if parallel is None:
        return None
    busy = _count(stats.get("slots_busy")) or 0
    free = _count(stats.get("slots_free"))
    return BatchingStats(
        parallel=parallel,
        slots_busy=busy,
        slots_free=max(parallel - busy, 0) if free is None else free,
        running=_count(stats.get("running")) or 0,
        waiting=_count(stats.get("waiting")) or 0,
        kv_cells_used=_count(stats.get("kv_cells_used")) or 0,
        kv_cells_total=_count(stats.get("kv_cells_total")) or 0,
        prompt_cache_hit_tokens=_count(stats.get("prompt_cache_hit_tokens")) or 0,
        prompt_tokens_evaluated=_count(stats.get("prompt_tokens_evaluated")) or 0,
        steps=_count(stats.get("steps")) or 0,
        sequences_per_step=_per_step(stats.get("sequences_per_step")),
    )


def slot_fields(stats: Any) -> dict[str, int | None]:
    """`SLOT_FIELDS` of a model's stats for the live views: numbers, or None without batching."""
    found = batching_stats(stats)
    if found is None:
        return dict.fromkeys(SLOT_FIELDS)
    return dict(found.slots())


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _per_step(value: Any) -> dict[int, int]:
    if not isinstance(value, Mapping):
        return {}
    found: dict[int, int] = {}
    for key, steps in value.items():
        if isinstance(key, str):  # JSON's keys are strings: "8" is 8 sequences
            key = int(key) if key.isascii() and key.isdigit() else None
        size, count = _count(key), _count(steps)
        if size is not None and size > 0 and count is not None:
            found[size] = count
    return found
