"""monitoring/: the Prometheus config, alert and recording rules (with their promtool unit
tests) and the Alertmanager config are valid for the real tools, and agree with Tiffin's own
config (port, metrics path, webhook route)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import DictConfig

from tests.binaries import require_binary, run_binary
from tests.conftest import ROOT

MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTMANAGER_YML = MONITORING / "alertmanager.yml"
RULE_FILES = sorted(MONITORING.glob("*rules.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_promtool_checks_the_prometheus_config() -> None:
    result = run_binary("promtool", "check", "config", str(PROMETHEUS_YML))
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda p: p.name)
def test_promtool_checks_each_rules_file(rules: Path) -> None:
    run_binary("promtool", "check", "rules", str(rules))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    assert RULE_TESTS, "no promtool tests in monitoring/tests"
    result = run_binary("promtool", "test", "rules", *map(str, RULE_TESTS))
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_amtool_checks_the_alertmanager_config() -> None:
    run_binary("amtool", "check-config", str(ALERTMANAGER_YML))


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=critical", "alertname=LLMHighErrorRate"], "tiffin,on-call"),
        (["severity=warning", "alertname=LLMHighErrorRate"], "tiffin"),
        (["alertname=SomethingElse"], "tiffin"),
    ],
)
def test_alertmanager_routes_everything_to_tiffin_and_critical_also_on_call(
    labels: list[str], receivers: str
) -> None:
    run_binary(
        "amtool",
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER_YML}",
        f"--verify.receivers={receivers}",
        *labels,
    )


def test_every_rules_file_is_loaded_and_every_rule_is_unit_tested() -> None:
    assert sorted(load(PROMETHEUS_YML)["rule_files"]) == [p.name for p in RULE_FILES]
    tests = [t for path in RULE_TESTS for t in load(path)["tests"]]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    recorded = {case["expr"] for t in tests for case in t.get("promql_expr_test", [])}
    for rules in RULE_FILES:
        for group in load(rules)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] in fired, f"{rule['alert']} is never tested firing"
                    assert rule["alert"] in quiet, f"{rule['alert']} is never tested quiet"
                    assert rule["labels"]["severity"] in ("warning", "critical")
                    assert {"summary", "description"} <= set(rule["annotations"])
                else:
                    assert rule["record"] in recorded, f"{rule['record']} is never tested"


def test_the_configs_point_at_tiffin_as_it_is_configured(
    compose_test: Callable[..., DictConfig],
) -> None:
    cfg = compose_test()
    [job] = load(PROMETHEUS_YML)["scrape_configs"]
    assert job["job_name"] == "llm-platform"
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"localhost:{cfg.server.http_port}"]
    webhook = cfg.handlers.routes.alertmanager_webhook.http
    assert webhook.method == "POST"
    [tiffin] = [r for r in load(ALERTMANAGER_YML)["receivers"] if r["name"] == "tiffin"]
    [hook] = tiffin["webhook_configs"]
    assert hook["url"] == f"http://localhost:{cfg.server.http_port}{webhook.path}"
    assert hook["send_resolved"] is True


def test_a_missing_binary_fails_in_ci_and_is_skipped_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="promtool is not installed"):
        require_binary("promtool")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="scripts/setup-system installs it"):
        require_binary("promtool")
