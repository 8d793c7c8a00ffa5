"""The "Batching" section of the Model Performance dashboard, over the `llm_engine_*` families
(engine_metrics.py): how full each batching engine's slots and KV cache are, how much of the
prompts the prompt cache saves, and how many sequences one decode step carries. Models whose
engine does not batch have no series here."""

from __future__ import annotations

from runtime.integrations.grafana.panels import Json, target, timeseries
from runtime.integrations.grafana.promql import quantile, rate, ratio

BY_MODEL = ("model",)


def batching_panels(model: str) -> list[Json]:
    """The section's panels; `model` is the dashboard's model matcher (`model=~"$model"`)."""

    def now(metric: str, legend: str) -> Json:
        return target(f"sum by (model) ({metric}{{{model}}})", f"{{{{model}}}} {legend}")

    hits = "llm_engine_prompt_cache_hit_tokens_total"
    evaluated = "llm_engine_prompt_tokens_evaluated_total"
    per_step = "llm_engine_sequences_per_step"
    return [
        timeseries(
            "Running sequences vs slots",
            [
                now("llm_engine_sequences_running", "running"),
                now("llm_engine_slots_busy", "slots busy"),
                now("llm_engine_slots_total", "slots"),
            ],
            description="Sequences being prefilled or decoded, against the engine's slots.",
            width=8,
        ),
        timeseries(
            "Requests waiting for a slot",
            [now("llm_engine_requests_waiting", "waiting")],
            description="Requests admitted to a batching engine that no slot has taken yet.",
            width=8,
        ),
        timeseries(
            "KV cache cells used vs total",
            [
                now("llm_engine_kv_cells_used", "used"),
                now("llm_engine_kv_cells_total", "total"),
            ],
            width=8,
        ),
        timeseries(
            "Prompt tokens/s: prompt cache hits vs evaluated",
            [
                target(rate(hits, model, BY_MODEL), "{{model}} cache hits"),
                target(rate(evaluated, model, BY_MODEL), "{{model}} evaluated"),
            ],
            unit="suffix: tok/s",
            description="Prompt tokens served from the prompt cache, and those evaluated.",
            width=8,
        ),
        timeseries(
            "Prompt cache hit ratio",
            [
                target(
                    ratio(
                        rate(hits, model, BY_MODEL),
                        f"({rate(hits, model, BY_MODEL)} + {rate(evaluated, model, BY_MODEL)})",
                    ),
                    "{{model}}",
                )
            ],
            unit="percentunit",
            description="The share of prompt tokens the prompt cache saved from evaluation.",
            width=8,
        ),
        timeseries(
            "Sequences per decode step",
            [
                target(quantile(0.5, per_step, model, BY_MODEL), "{{model}} p50"),
                target(quantile(0.95, per_step, model, BY_MODEL), "{{model}} p95"),
                target(
                    f"{rate(per_step + '_sum', model, BY_MODEL)}"
                    f" / {rate(per_step + '_count', model, BY_MODEL)}",
                    "{{model}} mean",
                ),
            ],
            description="How many sequences one decode step carried (buckets 1, 2, 4 ... 64).",
            width=8,
        ),
    ]
