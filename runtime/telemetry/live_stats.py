"""Live statistics of one Runtime, for people watching it now: the `metrics` snapshot that
`/ws/metrics`, GraphQL's `metrics` and `GET /metrics/live` show, and the recent generation
requests behind GraphQL's `generationRequests`.

Prometheus (metrics.py) is the record for dashboards and alerts, summed over workers; this is
the view of one worker over a sliding window, with percentiles computed from the requests
themselves. Memory is bounded: the last `capacity` requests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationRequestRecord:
    """One request that generated (or tried to), as `generationRequests` lists it."""

    id: str
    time: float
    endpoint: str
    transport: str
    model: str
    provider: str
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)
    key_name: str | None = None  # the API key's name, when the request carried one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Done:
    at: float
    endpoint: str
    model: str
    status: int
    seconds: float


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class LiveStats:
    """Requests and generations of this worker, kept for a snapshot over a window."""

    def __init__(self, capacity: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._done: deque[_Done] = deque(maxlen=capacity)
        self._generations: deque[GenerationRequestRecord] = deque(maxlen=capacity)
        self._pending: dict[str, GenerationRequestRecord] = {}
        self.in_flight = 0
        self.started_at = clock()
        self.totals = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.cost_total = 0.0
        # Called with each finished generation request (the database's request log).
        self.sinks: list[Callable[[GenerationRequestRecord], None]] = []

    # --- recording ------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.in_flight += 1

    def generation_finished(
        self, request_id: str, model: str, provider: str, response: dict[str, Any]
    ) -> None:
        """A generation of request `request_id` ended (a request may run several: n prompts)."""
        usage = response.get("usage")
        record = self._pending.get(request_id)
        if record is None:
            record = GenerationRequestRecord(request_id, self._clock(), "", "", model, provider)
            self._pending[request_id] = record
        if usage is not None:
            record.prompt_tokens += int(usage.prompt_tokens)
            record.completion_tokens += int(usage.completion_tokens)
        record.cost += float(response.get("cost") or 0.0)
        ttft = response.get("ttft_s")
        if ttft is not None and record.ttft_s is None:
            record.ttft_s = float(ttft)
        reasons = response.get("finish_reasons") or {}
        record.finish_reasons += [str(r) for r in dict(reasons).values()]

    def request_finished(
        self,
        request_id: str,
        endpoint: str,
        transport: str,
        model: str,
        provider: str,
        status: int,
        seconds: float,
        key_name: str | None = None,
    ) -> None:
        now = self._clock()
        self.in_flight = max(0, self.in_flight - 1)
        self.totals["requests"] += 1
        if status >= 400:
            self.totals["errors"] += 1
        self._done.append(_Done(now, endpoint, model, status, seconds))
        record = self._pending.pop(request_id, None)
        if record is None and not model:
            return  # no model involved: not a generation request
        if record is None:  # refused before generating (queue full, bad parameters...)
            record = GenerationRequestRecord(request_id, now - seconds, "", "", model, provider)
        record.endpoint, record.transport, record.status = endpoint, transport, status
        record.latency_s = seconds
        record.model = record.model or model
        record.provider = record.provider or provider
        record.key_name = key_name
        self.totals["prompt_tokens"] += record.prompt_tokens
        self.totals["completion_tokens"] += record.completion_tokens
        self.cost_total += record.cost
        self._generations.append(record)
        for sink in self.sinks:
            sink(record)

    # --- reading --------------------------------------------------------------------------------

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest generation requests, newest first."""
        records = list(self._generations)[-limit:] if limit > 0 else []
        return [r.to_dict() for r in reversed(records)]

    def snapshot(self, models: Iterable[dict[str, Any]], window_s: float = 60.0) -> dict[str, Any]:
        """Totals since start, rates and latency percentiles over the last `window_s` seconds,
        and per-model state (`models`: id, provider, state, in_flight, queue_depth and, from a
        batching engine, slots_busy, slots_free, running, waiting)."""
        now = self._clock()
        since = now - window_s
        span = max(min(window_s, now - self.started_at), 1e-9)
        done = [d for d in self._done if d.at >= since]
        gens = [g for g in self._generations if g.time + g.latency_s >= since]
        latencies = [d.seconds for d in done]
        ttfts = [g.ttft_s for g in gens if g.ttft_s is not None]
        per_model = []
        for model in models:
            mine = [g for g in gens if g.model == model["id"]]
            per_model.append(
                {
                    **model,
                    "requests": sum(1 for d in done if d.model == model["id"]),
                    "completion_tokens_per_s": sum(g.completion_tokens for g in mine) / span,
                    "latency_p95_s": percentile([g.latency_s for g in mine], 95),
                }
            )
        return {
            "time": now,
            "window_s": window_s,
            "requests": {
                "total": self.totals["requests"],
                "errors_total": self.totals["errors"],
                "in_flight": self.in_flight,
                "per_s": len(done) / span,
                "errors_per_s": sum(1 for d in done if d.status >= 400) / span,
            },
            "latency_s": {q: percentile(latencies, n) for q, n in _QUANTILES},
            "ttft_s": {q: percentile(ttfts, n) for q, n in _QUANTILES},
            "tokens": {
                "prompt_total": self.totals["prompt_tokens"],
                "completion_total": self.totals["completion_tokens"],
                "prompt_per_s": sum(g.prompt_tokens for g in gens) / span,
                "completion_per_s": sum(g.completion_tokens for g in gens) / span,
            },
            "cost_total": self.cost_total,
            "queue_depth": sum(int(m.get("queue_depth") or 0) for m in per_model),
            "models": per_model,
        }


_QUANTILES = (("p50", 50), ("p95", 95), ("p99", 99))
