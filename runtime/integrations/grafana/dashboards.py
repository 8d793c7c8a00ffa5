"""Tiffin's four Grafana dashboards, built from code over the metrics of
`runtime/telemetry/metrics.py`.

    python -m runtime.cli.grafana_files [monitoring/]

writes them to `monitoring/grafana/dashboards/<uid>.json` with Grafana's provisioning files
beside them (`provisioning.py`); the grafana integration imports the same models through
Grafana's HTTP API. `promql_expressions()` lists every query with Grafana's variables made
concrete, so tests can hand each one to promtool or a real Prometheus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runtime.integrations.grafana.engine_panels import batching_panels
from runtime.integrations.grafana.panels import (
    Json,
    dashboard,
    gauge,
    label_variable,
    panel_expressions,
    stat,
    table,
    target,
    thresholds,
    timeseries,
)
from runtime.integrations.grafana.promql import RANGE, concrete, increase, quantile, rate, ratio

MODEL = 'model=~"$model"'
# Route names (conf/handlers/default.yaml) that generate text.
GENERATION = 'endpoint=~"chat_completions|completions|ollama_chat|ollama_generate"'
COST_UNIT = "currencyUSD"  # the unit of the per-model prices in the config
COST_NOTE = " In the currency of the per-model prices in the config (`prices`)."

UIDS = ("tiffin-overview", "tiffin-models", "tiffin-resources", "tiffin-cost")


def quantiles(histogram: str, matchers: str = "", by: Sequence[str] = ()) -> list[Json]:
    """p50, p95 and p99 of a histogram, one target each."""
    prefix = " ".join(f"{{{{{label}}}}}" for label in by)
    return [
        target(quantile(q, histogram, matchers, by), f"{prefix} p{round(q * 100)}".strip())
        for q in (0.5, 0.95, 0.99)
    ]


# --- the dashboards ---------------------------------------------------------------------------


def overview() -> Json:
    requests, errors = "llm_requests_total", "llm_errors_total"
    traffic = [
        stat("Requests/s", [target(rate(requests))], unit="reqps"),
        stat(
            "Error ratio",
            [target(ratio(rate(errors), rate(requests)))],
            unit="percentunit",
            colours=thresholds((0.01, "orange"), (0.1, "red")),
            description="Requests that ended in an error, over all requests.",
        ),
        stat("Latency p95", [target(quantile(0.95, "llm_request_duration_seconds"))], unit="s"),
        stat("In flight", [target("sum(llm_requests_in_flight)")]),
        stat("Active models", [target("sum(llm_active_models)")]),
        stat(
            "Integrations down",
            [target("count(integration_up == 0) or vector(0)")],
            colours=thresholds((1, "red")),
        ),
        timeseries(
            "Requests/s by endpoint and status",
            [target(rate(requests, by=("endpoint", "status")), "{{endpoint}} {{status}}")],
            unit="reqps",
            stacked=True,
        ),
        timeseries(
            "Error ratio by endpoint",
            [target(ratio(rate(errors, by=("endpoint",)), rate(requests, by=("endpoint",))))],
            unit="percentunit",
        ),
        timeseries(
            "Errors/s by type and status",
            [target(rate(errors, by=("type", "status")), "{{type}} {{status}}")],
            unit="reqps",
        ),
        timeseries(
            "Requests/s by transport",
            [target(rate(requests, by=("transport",)), "{{transport}}")],
            unit="reqps",
            stacked=True,
        ),
    ]
    latency = [
        timeseries("Request latency", quantiles("llm_request_duration_seconds"), unit="s"),
        timeseries(
            "Request latency p95 by endpoint",
            [target(quantile(0.95, "llm_request_duration_seconds", by=("endpoint",)))],
            unit="s",
        ),
        timeseries("Time to first token", quantiles("llm_time_to_first_token_seconds"), unit="s"),
        timeseries(
            "In flight by endpoint",
            [
                target(
                    "sum by (endpoint, transport) (llm_requests_in_flight)",
                    "{{endpoint}} ({{transport}})",
                )
            ],
            stacked=True,
        ),
    ]
    health = "integration_health_check_duration_seconds"
    integrations = [
        table(
            "Integrations",
            [target("max by (name) (integration_up)", table=True)],
            value_text={"0": ("down", "red"), "1": ("up", "green")},
            width=6,
            description="1 while an integration is active or degraded, 0 otherwise.",
        ),
        timeseries(
            "Health-check latency p95",
            [target(quantile(0.95, health, by=("name",)), "{{name}}")],
            unit="s",
            width=6,
        ),
        timeseries(
            "Integration restarts",
            [target(increase("integration_restarts_total", by=("name",)), "{{name}}")],
            bars=True,
            width=6,
            description="Background recoveries of failed integrations.",
        ),
        timeseries(
            "Config applies",
            [target(increase("llm_config_applies_total", by=("result",)), "{{result}}")],
            bars=True,
            width=6,
            description="Configs applied to the running server, or refused"
            " (python -m runtime apply, SIGHUP, a changed config file).",
        ),
    ]
    batch = [
        timeseries(
            "Batch lines",
            [target(increase("llm_batch_lines_total", by=("state",)), "{{state}}")],
            bars=True,
            width=8,
            description="Batch lines queued, and answered (succeeded: 2xx, failed: any other).",
        ),
        timeseries(
            "Batch lines running and waiting",
            [
                target("sum(llm_batch_lines_running)", "running"),
                target("max(llm_batch_lines_waiting)", "waiting on the queue"),
            ],
            width=8,
            description="Lines running on a model now, and lines no worker has taken yet.",
        ),
        timeseries(
            "Batches finished",
            [target(increase("llm_batches_total", by=("status",)), "{{status}}")],
            bars=True,
            width=8,
            description="Batches by final status: completed, failed, expired, cancelled.",
        ),
    ]
    return dashboard(
        UIDS[0],
        "LLM Platform Overview",
        "Traffic, errors, latency, integration health and batch work of Tiffin.",
        [
            ("Traffic", traffic),
            ("Latency", latency),
            ("Integrations", integrations),
            ("Batch", batch),
        ],
        tags=["llm", "overview"],
    )


def model_performance() -> Json:
    ttft, tpot = "llm_time_to_first_token_seconds", "llm_time_per_output_token_seconds"
    duration = "llm_request_duration_seconds"
    by_model = ("model", "provider")
    per_model = "{{model}} ({{provider}})"
    speed = [
        timeseries(
            "Time to first token p95 by model",
            [target(quantile(0.95, ttft, MODEL, by_model), per_model)],
            unit="s",
        ),
        timeseries("Time to first token", quantiles(ttft, MODEL), unit="s"),
        timeseries(
            "Time per output token p95 by model",
            [target(quantile(0.95, tpot, MODEL, by_model), per_model)],
            unit="s",
        ),
        timeseries(
            "Decode speed of the median generation",
            [target(f"1 / {quantile(0.5, tpot, MODEL, by_model)}", per_model)],
            unit="suffix: tok/s",
            description="Output tokens per second, from the median time per output token.",
        ),
        timeseries(
            "Generation latency p95 by model",
            [target(quantile(0.95, duration, f"{MODEL}, {GENERATION}", by_model), per_model)],
            unit="s",
            description="Whole requests on the generation routes (streams: to their end).",
            width=24,
        ),
    ]
    tokens, requests = "llm_tokens_total", "llm_requests_total"
    throughput = [
        timeseries(
            "Tokens/s: prompt vs completion",
            [target(rate(tokens, MODEL, ("kind",)), "{{kind}}")],
            unit="suffix: tok/s",
            stacked=True,
        ),
        timeseries(
            "Completion tokens/s by model",
            [target(rate(tokens, f'{MODEL}, kind="completion"', by_model), per_model)],
            unit="suffix: tok/s",
            stacked=True,
        ),
        timeseries(
            "Generation requests/s by model and status",
            [
                target(
                    rate(requests, f"{MODEL}, {GENERATION}", ("model", "status")),
                    "{{model}} {{status}}",
                )
            ],
            unit="reqps",
        ),
        timeseries(
            "Error ratio by model",
            [
                target(
                    ratio(
                        rate("llm_errors_total", f'{MODEL}, model!=""', ("model",)),
                        rate(requests, f'{MODEL}, model!=""', ("model",)),
                    ),
                    "{{model}}",
                )
            ],
            unit="percentunit",
        ),
    ]
    loads = "llm_model_loads_total"

    def loads_in_range(status: str) -> Json:
        matchers = f'status="{status}", {MODEL}'
        return target(f"{increase(loads, matchers, window=RANGE)} or vector(0)", instant=True)

    capacity = [
        stat("Active models", [target("sum(llm_active_models)")], width=6),
        stat("Queued now", [target(f"sum(llm_queue_depth{{{MODEL}}}) or vector(0)")], width=6),
        stat("Model loads in range", [loads_in_range("success")], width=6),
        stat(
            "Load failures in range",
            [loads_in_range("failure")],
            width=6,
            colours=thresholds((1, "red")),
        ),
        timeseries(
            "Queue depth by model",
            [target(f"sum by (model, provider) (llm_queue_depth{{{MODEL}}})", per_model)],
            description="Requests admitted to a model and waiting for it.",
        ),
        timeseries(
            "Model loads by outcome",
            [target(increase(loads, MODEL, ("model", "status")), "{{model}} {{status}}")],
            bars=True,
        ),
    ]
    return dashboard(
        UIDS[1],
        "Model Performance",
        "Per model: time to first token, decode speed, throughput, errors, queues and loads,"
        " and the batching engines' slots, KV cache, prompt cache and sequences per step.",
        [
            ("Speed", speed),
            ("Throughput", throughput),
            ("Capacity", capacity),
            ("Batching", batching_panels(MODEL)),
        ],
        variables=[label_variable("model", "Model", "llm_tokens_total")],
        tags=["llm", "models"],
    )


def resource_monitoring() -> Json:
    used, total = "llm_gpu_memory_usage_bytes", "llm_gpu_memory_total_bytes"
    busy = thresholds((70, "orange"), (90, "red"))
    gpu_share = f"100 * sum by (gpu) ({used}) / sum by (gpu) ({total})"
    now = [
        gauge("CPU", [target("max(llm_cpu_usage_percent)")], colours=busy),
        stat(
            "Resident memory",
            [target("sum(llm_process_resident_memory_bytes)")],
            unit="bytes",
            width=6,
            height=6,
        ),
        gauge(
            "GPU memory used",
            [target(f"100 * sum({used}) / sum({total})")],
            colours=thresholds((80, "orange"), (90, "red")),
            description="All GPUs together. No data on a machine without a GPU.",
        ),
        stat("GPU memory in use", [target(f"sum({used})")], unit="bytes", width=6, height=6),
    ]
    over_time = [
        timeseries(
            "CPU usage",
            [target("max by (instance) (llm_cpu_usage_percent)", "{{instance}}")],
            unit="percent",
            description="CPU busy across the machine, 0-100.",
        ),
        timeseries(
            "Resident memory of the serving processes",
            [target("sum by (instance) (llm_process_resident_memory_bytes)", "{{instance}}")],
            unit="bytes",
        ),
        timeseries(
            "GPU memory used vs total",
            [
                target(f"sum by (gpu) ({used})", "GPU {{gpu}} used"),
                target(f"sum by (gpu) ({total})", "GPU {{gpu}} total"),
            ],
            unit="bytes",
        ),
        timeseries("GPU memory used by GPU", [target(gpu_share, "GPU {{gpu}}")], unit="percent"),
    ]
    load = [
        timeseries("Active models", [target("sum(llm_active_models)", "models")], width=8),
        timeseries(
            "Queue depth",
            [target("sum by (model) (llm_queue_depth)", "{{model}}")],
            stacked=True,
            width=8,
        ),
        timeseries(
            "Requests in flight",
            [target("sum by (transport) (llm_requests_in_flight)", "{{transport}}")],
            stacked=True,
            width=8,
        ),
    ]
    return dashboard(
        UIDS[2],
        "Resource Monitoring",
        "CPU, memory and GPU memory of the serving processes, and the load on them.",
        [("Now", now), ("Over time", over_time), ("Load", load)],
        tags=["llm", "resources"],
    )


def cost_analysis() -> Json:
    cost, tokens = "llm_cost_total", "llm_tokens_total"
    per_1k = f"1000 * {rate(cost, MODEL, ('model',))} / {rate(tokens, MODEL, ('model',))}"
    range_cost = increase(cost, MODEL, window=RANGE)
    range_tokens = increase(tokens, MODEL, window=RANGE)
    totals = [
        stat(
            "Cost in range", [target(range_cost, instant=True)], unit=COST_UNIT, width=6, decimals=4
        ),
        stat(
            "Cost per hour at the current rate",
            [target(f"3600 * {rate(cost, MODEL)}")],
            unit=COST_UNIT,
            width=6,
            decimals=4,
        ),
        stat(
            "Projected 30-day cost",
            [target(f"30 * 86400 * {rate(cost, MODEL)}")],
            unit=COST_UNIT,
            width=6,
            decimals=2,
            description="The current cost rate kept up for 30 days." + COST_NOTE,
        ),
        stat(
            "Cost per 1k tokens",
            [target(f"1000 * {range_cost} / clamp_min({range_tokens}, 1)", instant=True)],
            unit=COST_UNIT,
            width=6,
            decimals=5,
            description="Over the dashboard's range, prompt and completion tokens together.",
        ),
    ]
    by_model = [
        timeseries(
            "Cost per hour by model",
            [target(f"3600 * {rate(cost, MODEL, ('model', 'provider'))}", "{{model}}")],
            unit=COST_UNIT,
            stacked=True,
        ),
        timeseries(
            "Cumulative cost by model",
            [target(f"sum by (model) ({cost}{{{MODEL}}})", "{{model}}")],
            unit=COST_UNIT,
            description="Counted since each serving process started." + COST_NOTE,
        ),
        timeseries("Cost per 1k tokens by model", [target(per_1k, "{{model}}")], unit=COST_UNIT),
        timeseries(
            "Tokens/s by model and kind",
            [target(rate(tokens, MODEL, ("model", "kind")), "{{model}} {{kind}}")],
            unit="suffix: tok/s",
            stacked=True,
        ),
        table(
            "Cost by model in range",
            [target(increase(cost, MODEL, ("model", "provider"), RANGE), table=True)],
            unit=COST_UNIT,
        ),
        table(
            "Tokens by model in range",
            [target(increase(tokens, MODEL, ("model", "kind"), RANGE), table=True)],
        ),
    ]
    return dashboard(
        UIDS[3],
        "Cost Analysis",
        "Estimated cost of generations by model, its rate, and cost per token." + COST_NOTE,
        [("Totals", totals), ("By model", by_model)],
        variables=[label_variable("model", "Model", "llm_cost_total")],
        tags=["llm", "cost"],
    )


# --- public API -----------------------------------------------------------------------------------


def build_dashboards() -> list[dict[str, Any]]:
    """The four dashboards as Grafana JSON models, in UIDS order."""
    return [overview(), model_performance(), resource_monitoring(), cost_analysis()]


def promql_expressions(dashboard: dict[str, Any] | None = None) -> list[str]:
    """Every PromQL expression of `dashboard` (default: all four), each once, with Grafana's
    variables replaced by concrete values (`$__rate_interval` -> 1m, `$model` -> .*)."""
    models = [dashboard] if dashboard is not None else build_dashboards()
    return list(dict.fromkeys(concrete(e) for m in models for e in panel_expressions(m)))
