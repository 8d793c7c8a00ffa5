"""The Grafana dashboards built in runtime/integrations/grafana/dashboards.py: the checked-in
files are what the code generates, every query is valid PromQL (promtool), every metric family
is shown."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client.metrics_core import Metric

from runtime.integrations.grafana.dashboards import UIDS, build_dashboards, promql_expressions
from runtime.integrations.grafana.panels import (
    DATASOURCE_UID,
    GRID_WIDTH,
    PROMETHEUS,
    content_hash,
    content_marker,
    panel_expressions,
)
from runtime.integrations.grafana.provisioning import REGENERATE
from runtime.telemetry.metrics import Metrics
from tests.binaries import require_binary
from tests.conftest import PYTHON, ROOT, cli_env

MONITORING = ROOT / "monitoring"
TITLES = ["LLM Platform Overview", "Model Performance", "Resource Monitoring", "Cost Analysis"]


def test_the_checked_in_files_are_what_the_code_generates(tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "runtime.cli.grafana_files", str(tmp_path)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(
        p.relative_to(MONITORING) for p in (MONITORING / "grafana").rglob("*") if p.is_file()
    )
    advice = f"run `{REGENERATE}` from the repository root and commit the result"
    assert checked_in == generated, f"monitoring/grafana differs from the generated set: {advice}"
    for relative in generated:
        fresh = (tmp_path / relative).read_bytes()
        assert (MONITORING / relative).read_bytes() == fresh, (
            f"monitoring/{relative} is stale: {advice}"
        )
        assert fresh.endswith(b"\n") and not fresh.endswith(b"\n\n")


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    expressions = promql_expressions()
    assert expressions and not [e for e in expressions if "$" in e]
    rules = {
        "groups": [
            {
                "name": "tiffin-dashboards",
                "rules": [
                    {"record": f"tiffin:dashboard_expression_{i}", "expr": expr}
                    for i, expr in enumerate(expressions)
                ],
            }
        ]
    }
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(json.dumps(rules, indent=2))  # JSON is YAML
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_the_four_dashboards() -> None:
    dashboards = build_dashboards()
    assert [d["title"] for d in dashboards] == TITLES
    assert [d["uid"] for d in dashboards] == list(UIDS)
    assert build_dashboards() == dashboards  # deterministic
    for model in dashboards:
        assert "tiffin" in model["tags"]
        assert content_marker(model) == f"tiffin-content-{content_hash(model)}"
        [datasource] = [v for v in model["templating"]["list"] if v["name"] == "datasource"]
        assert datasource["current"]["value"] == DATASOURCE_UID
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        for panel in model["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == PROMETHEUS and panel["targets"], panel["title"]
            for query in panel["targets"]:
                assert query["datasource"] == PROMETHEUS
                if "[" in query["expr"] and "$__range" not in query["expr"]:
                    assert "[$__rate_interval]" in query["expr"], query["expr"]
        assert promql_expressions(model)
        if any("$model" in e for e in panel_expressions(model)):
            assert "model" in [v["name"] for v in model["templating"]["list"]]


def test_every_metric_family_is_on_a_dashboard() -> None:
    used = " ".join(promql_expressions())
    families: list[Metric] = list(Metrics().registry.collect())
    assert len(families) == 32
    for family in families:
        name = {"counter": f"{family.name}_total", "histogram": f"{family.name}_bucket"}.get(
            family.type, family.name
        )
        assert re.search(rf"\b{name}\b", used), f"{name} is on no dashboard"


def test_model_performance_shows_the_batching_engines() -> None:
    model = build_dashboards()[1]
    titles = [p["title"] for p in model["panels"]]
    batching = titles[titles.index("Batching") + 1 :]
    assert batching == [
        "Running sequences vs slots",
        "Requests waiting for a slot",
        "KV cache cells used vs total",
        "Prompt tokens/s: prompt cache hits vs evaluated",
        "Prompt cache hit ratio",
        "Sequences per decode step",
    ]
    used = " ".join(promql_expressions(model))
    for name in (
        "llm_engine_sequences_running",
        "llm_engine_slots_total",
        "llm_engine_requests_waiting",
        "llm_engine_kv_cells_used",
        "llm_engine_kv_cells_total",
        "llm_engine_prompt_cache_hit_tokens_total",
        "llm_engine_prompt_tokens_evaluated_total",
    ):
        assert re.search(rf"\b{name}\{{model=~", used), name
    assert (
        "histogram_quantile(0.95, sum by (model, le) (rate(llm_engine_sequences_per_step_bucket"
        in used
    )


def test_the_content_marker_follows_the_content() -> None:
    model = build_dashboards()[0]
    assert content_hash({**model, "id": 7, "version": 3}) == content_hash(model)
    edited = {**model, "panels": [{**model["panels"][0], "title": "Edited"}, *model["panels"][1:]]}
    assert content_hash(edited) != content_hash(model)


def test_the_provisioning_files_name_the_datasource_the_dashboards_use() -> None:
    datasources = (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    assert f"uid: {DATASOURCE_UID}" in datasources
    assert "url: http://prometheus:9090" in datasources
    provider = (MONITORING / "grafana/provisioning/dashboards/tiffin.yml").read_text()
    assert "type: file" in provider and "path: /var/lib/grafana/dashboards/tiffin" in provider
