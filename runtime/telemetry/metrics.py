"""Prometheus metrics: the platform guide's `llm_*` families plus the integration ones.

One `Metrics` object per Runtime, on its own `CollectorRegistry` (a test can build many).
Under BentoML with several workers, prometheus_client runs in multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by BentoML before a worker imports anything): every worker
writes its samples to files there and one scrape of `/metrics` adds them up. Gauges say how
workers combine (`multiprocess_mode`): `livesum` for things each worker holds (requests in
flight, queue depth, memory), `livemax` for machine-wide readings every worker takes (CPU, GPU),
`livemin` for `integration_up` (down if any worker sees it down).

Labels are bounded: route names, transport names, configured model ids and providers, status
codes and error types from a fixed set. Never request ids or user text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from runtime.telemetry.batch_metrics import BatchMetrics
from runtime.telemetry.engine_metrics import EngineMetrics

# Seconds: LLM requests run from milliseconds (cached, errors) to minutes (long generations).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
HEALTH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# OpenAI error types (and our own): anything else is counted as `other`.
ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "server_error",
        "service_unavailable",
        "timeout",
        "cancelled",
        "api_error",
    }
)
# The errors every route may answer before a model is chosen (so with model=""), as status and
# type: each served route starts with these `llm_errors_total` series at 0. A 404 for an unknown
# model is OpenAI's invalid_request_error; not_found_error is for other things (integrations).
ROUTE_ERRORS = (
    (400, "invalid_request_error"),
    (401, "authentication_error"),
    (403, "permission_error"),
    (404, "invalid_request_error"),
    (404, "not_found_error"),
    (429, "rate_limit_error"),
    (500, "server_error"),
    (503, "server_error"),
)
# The type of a failed request that raised no error of its own (a handler's Reply with 4xx).
STATUS_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    499: "cancelled",
    504: "timeout",
}


def error_type_for(status: int) -> str | None:
    """The error type of a request that ended with `status` and raised nothing: None below
    400, OpenAI's type for the usual statuses, else invalid_request_error (4xx) or
    server_error (5xx)."""
    if status < 400:
        return None
    return STATUS_ERROR_TYPES.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


REQUEST_LABELS = ("endpoint", "transport", "model", "provider", "status")
MODEL_LABELS = ("model", "provider")


def multiprocess_dir() -> str | None:
    """The directory prometheus_client writes to under several workers, if any."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, on any transport."""

    endpoint: str
    transport: str
    status: int
    seconds: float
    model: str = ""
    provider: str = ""
    error_type: str | None = None  # set when the request failed


@dataclass(frozen=True)
class GenerationRecord:
    """One finished generation: what it used, how fast it was, what it cost."""

    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ttft_s: float | None
    cost: float


class Metrics:
    """Every Tiffin metric family, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llm_requests_total", "Requests handled, by route and outcome.", REQUEST_LABELS,
            registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "llm_request_duration_seconds",
            "Time from a request's arrival to its last byte (streams: the end of the stream).",
            REQUEST_LABELS,
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "llm_errors_total",
            "Requests that ended in an error, by status and error type.",
            (*REQUEST_LABELS, "type"),
            registry=r,
        )
        self.in_flight = Gauge(
            "llm_requests_in_flight",
            "Requests being handled now (streams until they end).",
            ("endpoint", "transport"),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "llm_time_to_first_token_seconds",
            "Time from a generation's start to its first token.",
            MODEL_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llm_time_per_output_token_seconds",
            "Mean time between output tokens of one generation (after the first).",
            MODEL_LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "llm_tokens_total",
            "Tokens processed: kind=prompt (read) or completion (generated).",
            (*MODEL_LABELS, "kind"),
            registry=r,
        )
        self.cost = Counter(
            "llm_cost_total",
            "Estimated cost of generations, from the per-model prices in the config.",
            MODEL_LABELS,
            registry=r,
        )
        self.config_applies = Counter(
            "llm_config_applies_total",
            "Configs applied to the running server (result=applied|rejected).",
            ("result",),
            registry=r,
        )
        for result in ("applied", "rejected"):  # 0 from the start: no apply is not no data
            self.config_applies.labels(result)
        self.model_loads = Counter(
            "llm_model_loads_total",
            "Model loads, by outcome (status=success|failure).",
            (*MODEL_LABELS, "status"),
            registry=r,
        )
        self.active_models = Gauge(
            "llm_active_models",
            "Models loaded and ready to generate (per worker; the highest worker's count).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.queue_depth = Gauge(
            "llm_queue_depth",
            "Requests admitted to a model and waiting for it.",
            MODEL_LABELS,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.gpu_memory = Gauge(
            "llm_gpu_memory_usage_bytes",
            "GPU memory in use (NVML; no series without a GPU).",
            ("gpu",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.gpu_memory_total = Gauge(
            "llm_gpu_memory_total_bytes",
            "GPU memory in all (NVML; no series without a GPU).",
            ("gpu",),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cpu = Gauge(
            "llm_cpu_usage_percent",
            "CPU busy across the machine, 0-100 (psutil).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rss = Gauge(
            "llm_process_resident_memory_bytes",
            "Resident memory of the serving processes (summed over workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.integration_up = Gauge(
            "integration_up",
            "1 while an integration is up (active or degraded), else 0.",
            ("name",),
            registry=r,
            multiprocess_mode="livemin",
        )
        self.health_duration = Histogram(
            "integration_health_check_duration_seconds",
            "Time one integration health check took.",
            ("name",),
            buckets=HEALTH_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "integration_restarts_total",
            "Times a failed integration was started again by background recovery.",
            ("name",),
            registry=r,
        )
        # The batching engines' slots, KV cells, prompt cache and decode steps (`llm_engine_*`).
        self.engines = EngineMetrics(r)
        # The Batch API's lines and batches (`llm_batch_*`).
        self.batches = BatchMetrics(r)

    # --- series known from the start -----------------------------------------------------------

    def route_served(self, endpoint: str, transport: str) -> None:
        """Give a route, on one transport, its series at 0 before its first request: requests
        (status 200), in flight, and the errors of ROUTE_ERRORS. A series born at 1 has
        no earlier sample, so rate() and increase() would miss the first request or error, and
        dashboards and alerts would say "no data" on a fresh server. (Durations are left to
        the first request: a quantile of no requests is no data whatever the buckets hold.)"""
        labels = (endpoint, transport, "", "")
        self.requests.labels(*labels, "200")
        self.in_flight.labels(endpoint, transport)
        for status, kind in ROUTE_ERRORS:
            self.errors.labels(*labels, str(status), kind)

    def model_served(self, model: str, provider: str) -> None:
        """Give a model its generation series at 0 before its first generation."""
        for kind in ("prompt", "completion"):
            self.tokens.labels(model, provider, kind)
        self.cost.labels(model, provider)
        self.ttft.labels(model, provider)
        self.tpot.labels(model, provider)
        for status in ("success", "failure"):
            self.model_loads.labels(model, provider, status)

    # --- recording ------------------------------------------------------------------------------

    def request_started(self, endpoint: str, transport: str) -> None:
        self.in_flight.labels(endpoint, transport).inc()

    def request_finished(self, record: RequestRecord) -> None:
        self.in_flight.labels(record.endpoint, record.transport).dec()
        labels = (record.endpoint, record.transport, record.model, record.provider)
        status = str(record.status)
        self.requests.labels(*labels, status).inc()
        self.request_duration.labels(*labels, status).observe(record.seconds)
        if record.error_type is not None:
            kind = record.error_type if record.error_type in ERROR_TYPES else "other"
            self.errors.labels(*labels, status, kind).inc()

    def generation_finished(self, record: GenerationRecord) -> None:
        labels = (record.model, record.provider)
        self.tokens.labels(*labels, "prompt").inc(record.prompt_tokens)
        self.tokens.labels(*labels, "completion").inc(record.completion_tokens)
        if record.cost:
            self.cost.labels(*labels).inc(record.cost)
        else:  # the series exists from the first generation on, so dashboards show 0, not "no data"
            self.cost.labels(*labels)
        if record.ttft_s is not None:
            self.ttft.labels(*labels).observe(record.ttft_s)
            if record.completion_tokens > 1:
                per_token = (record.seconds - record.ttft_s) / (record.completion_tokens - 1)
                self.tpot.labels(*labels).observe(max(per_token, 0.0))

    def model_load(self, model: str, provider: str, *, ok: bool) -> None:
        self.model_loads.labels(model, provider, "success" if ok else "failure").inc()

    def health_checked(self, name: str, seconds: float) -> None:
        self.health_duration.labels(name).observe(seconds)

    # --- exposition -----------------------------------------------------------------------------

    def exposition(self) -> tuple[bytes, str]:
        """The text format for `/metrics`: every worker's samples under multiprocess mode,
        this registry's otherwise."""
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST
