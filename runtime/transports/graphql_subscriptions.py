"""GraphQL's wire types for the live view: the metrics snapshot (`metrics` query and
subscription) and the recent generation requests (`generationRequests`), built from the dicts
of handlers/live_feeds.py."""

from __future__ import annotations

from typing import Any

import strawberry


@strawberry.type(description="Percentiles of a duration over the window, in seconds.")
class Percentiles:
    p50: float | None
    p95: float | None
    p99: float | None


@strawberry.type(description="Requests over the window and since start.")
class RequestRates:
    total: int
    errors_total: int
    in_flight: int
    per_s: float
    errors_per_s: float


@strawberry.type(description="Tokens since start and per second over the window.")
class TokenRates:
    prompt_total: int
    completion_total: int
    prompt_per_s: float
    completion_per_s: float


@strawberry.type(description="One model in the snapshot.")
class ModelMetrics:
    id: str
    provider: str
    status: str
    in_flight: int
    queue_depth: int
    requests: int
    completion_tokens_per_s: float
    latency_p95_s: float | None
    slots_busy: int | None = strawberry.field(
        default=None, description="Slots of a batching engine in use; null for other engines."
    )
    slots_free: int | None = strawberry.field(
        default=None, description="Slots of a batching engine free; null for other engines."
    )
    running: int | None = strawberry.field(
        default=None, description="Sequences a batching engine is prefilling or decoding."
    )
    waiting: int | None = strawberry.field(
        default=None, description="Requests waiting inside a batching engine for a slot."
    )


@strawberry.type(description="This worker's live metrics over the last `windowS` seconds.")
class MetricsSnapshot:
    time: float
    window_s: float
    requests: RequestRates
    latency_s: Percentiles
    ttft_s: Percentiles
    tokens: TokenRates
    cost_total: float
    queue_depth: int
    models: list[ModelMetrics]


@strawberry.type(description="One generation request, as recorded when it ended.")
class GenerationRequest:
    id: str
    time: float
    model: str
    provider: str
    transport: str
    endpoint: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    cost: float
    finish_reasons: list[str]


def _percentiles(values: dict[str, Any] | None) -> Percentiles:
    values = values or {}
    return Percentiles(p50=values.get("p50"), p95=values.get("p95"), p99=values.get("p99"))


def metrics_snapshot(snapshot: dict[str, Any]) -> MetricsSnapshot:
    rates = snapshot.get("requests") or {}
    tokens = snapshot.get("tokens") or {}
    return MetricsSnapshot(
        time=float(snapshot.get("time") or 0.0),
        window_s=float(snapshot.get("window_s") or 0.0),
        requests=RequestRates(
            total=int(rates.get("total") or 0),
            errors_total=int(rates.get("errors_total") or 0),
            in_flight=int(rates.get("in_flight") or 0),
            per_s=float(rates.get("per_s") or 0.0),
            errors_per_s=float(rates.get("errors_per_s") or 0.0),
        ),
        latency_s=_percentiles(snapshot.get("latency_s")),
        ttft_s=_percentiles(snapshot.get("ttft_s")),
        tokens=TokenRates(
            prompt_total=int(tokens.get("prompt_total") or 0),
            completion_total=int(tokens.get("completion_total") or 0),
            prompt_per_s=float(tokens.get("prompt_per_s") or 0.0),
            completion_per_s=float(tokens.get("completion_per_s") or 0.0),
        ),
        cost_total=float(snapshot.get("cost_total") or 0.0),
        queue_depth=int(snapshot.get("queue_depth") or 0),
        models=[
            ModelMetrics(
                id=m["id"],
                provider=m.get("provider") or "",
                status=m.get("state") or "",
                in_flight=int(m.get("in_flight") or 0),
                queue_depth=int(m.get("queue_depth") or 0),
                requests=int(m.get("requests") or 0),
                completion_tokens_per_s=float(m.get("completion_tokens_per_s") or 0.0),
                latency_p95_s=m.get("latency_p95_s"),
                slots_busy=m.get("slots_busy"),
                slots_free=m.get("slots_free"),
                running=m.get("running"),
                waiting=m.get("waiting"),
            )
            for m in snapshot.get("models") or []
        ],
    )


def generation_request(record: dict[str, Any]) -> GenerationRequest:
    return GenerationRequest(
        id=record["id"],
        time=float(record.get("time") or 0.0),
        model=record.get("model") or "",
        provider=record.get("provider") or "",
        transport=record.get("transport") or "",
        endpoint=record.get("endpoint") or "",
        status=int(record.get("status") or 0),
        prompt_tokens=int(record.get("prompt_tokens") or 0),
        completion_tokens=int(record.get("completion_tokens") or 0),
        latency_s=float(record.get("latency_s") or 0.0),
        ttft_s=record.get("ttft_s"),
        cost=float(record.get("cost") or 0.0),
        finish_reasons=[str(r) for r in record.get("finish_reasons") or []],
    )
