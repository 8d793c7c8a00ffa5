"""End to end: a rule in a real Prometheus fires, a real Alertmanager routes it by the route tree
of monitoring/alertmanager.yml, and Tiffin (served in-process by uvicorn on loopback) turns each
notification into `alert.firing` and then `alert.resolved` events. The alertmanager integration
is checked against the real server.

Prometheus and Alertmanager come from the Debian packages (scripts/setup-system), started on free
loopback ports in a temp dir with monitoring/prometheus.yml and monitoring/alertmanager.yml
rewritten for second-scale intervals and the test's ports; the real rule files are loaded too.
Both of alertmanager.yml's receivers point at Tiffin here, so the `receiver` of each event shows
the route an alert took.

The test alert fires while a "switch" target answers Prometheus's scrapes, and resolves when it
stops. (Not a rule rewritten and reloaded: after each reload Prometheus is without its
Alertmanager until discovery catches up, up to 5 s, and drops the alerts it fires meanwhile.)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from omegaconf import DictConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import handlers
from runtime.app import Runtime
from runtime.events import BusEvent
from runtime.integrations import IntegrationStatus
from runtime.integrations.alertmanager import AlertmanagerIntegration
from runtime.integrations.prometheus import PrometheusIntegration
from runtime.transports.http import create_app
from tests.conftest import free_port
from tests.real_alertmanager import Alertmanager, running_alertmanager
from tests.real_prometheus import Prometheus, running_prometheus
from tests.test_monitoring import ALERTMANAGER_YML, MONITORING, PROMETHEUS_YML
from tests.thread_server import ThreadServer

pytestmark = pytest.mark.slow

WAIT_S = 60  # for an alert to travel Prometheus -> Alertmanager -> Tiffin
WEBHOOK_PATH = "/integrations/alertmanager/webhook"
TEST_ALERT = "TiffinEndToEnd"
SWITCH_JOB = "tiffin-end-to-end-switch"
TEST_RULES = {
    "groups": [
        {
            "name": "tiffin-end-to-end",
            "interval": "1s",
            "rules": [
                {
                    "alert": TEST_ALERT,
                    "expr": f'up{{job="{SWITCH_JOB}"}} == 1',
                    "labels": {"severity": "critical"},
                    "annotations": {
                        "summary": "Tiffin end-to-end test alert",
                        "description": "Raised by tests/test_alerting.py while its switch is on.",
                    },
                }
            ],
        }
    ]
}


@dataclass
class Stack:
    """Prometheus and Alertmanager, set up to scrape and notify a Tiffin on `tiffin_port`."""

    tiffin_port: int
    switch_port: int
    prometheus: Prometheus
    alertmanager: Alertmanager

    def logs(self) -> str:
        prometheus = self.prometheus.log.read_text(errors="replace")[-3000:]
        alertmanager = self.alertmanager.log_tail()
        return f"--- prometheus log:\n{prometheus}\n--- alertmanager log:\n{alertmanager}"


def alertmanager_config(webhook: str) -> dict[str, Any]:
    """monitoring/alertmanager.yml, notifying within a second, every receiver at Tiffin."""
    config: dict[str, Any] = yaml.safe_load(ALERTMANAGER_YML.read_text())
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = webhook
    return config


def prometheus_config(tiffin_port: int, switch_port: int, alertmanager: str) -> dict[str, Any]:
    """monitoring/prometheus.yml's scrape job and alerting, with the test's ports and 1 s
    scrapes, plus the switch target. (running_prometheus sets 1 s intervals and the rule files.)"""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{tiffin_port}"]}]
    switch = {"job_name": SWITCH_JOB, "static_configs": [{"targets": [f"127.0.0.1:{switch_port}"]}]}
    [alertmanagers] = config["alerting"]["alertmanagers"]
    alertmanagers["static_configs"] = [{"targets": [alertmanager]}]
    return {"scrape_configs": [job, switch], "alerting": config["alerting"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("alerting")
    tiffin_port, switch_port = free_port(), free_port()
    webhook = f"http://127.0.0.1:{tiffin_port}{WEBHOOK_PATH}"
    test_rules = root / "test_rules.yml"
    test_rules.write_text(yaml.safe_dump(TEST_RULES))
    rule_files = [
        MONITORING / name for name in yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]
    ]
    with running_alertmanager(root / "alertmanager", alertmanager_config(webhook)) as alertmanager:
        extra = prometheus_config(tiffin_port, switch_port, alertmanager.address)
        with running_prometheus(
            root / "prometheus",
            [f"127.0.0.1:{tiffin_port}"],
            rule_files=[*rule_files, test_rules],
            extra=extra,
        ) as prometheus:
            stack = Stack(tiffin_port, switch_port, prometheus, alertmanager)
            # Prometheus drops the alerts it fires before discovery names its Alertmanager.
            prometheus.wait_until(lambda: bool(prometheus_alertmanagers(stack)), "alertmanager")
            yield stack


def prometheus_alertmanagers(stack: Stack) -> list[Any]:
    body = httpx.get(stack.prometheus.url + "/api/v1/alertmanagers", timeout=5).json()
    return list(body["data"]["activeAlertmanagers"])


@contextmanager
def switch_on(stack: Stack) -> Iterator[None]:
    """Serve the switch target: the test alert fires while the block runs, resolves after."""

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse("tiffin_end_to_end_switch 1\n")

    server = ThreadServer(stack.switch_port)
    server.serve(Starlette(routes=[Route("/metrics", metrics)]), "switch target")
    try:
        yield
    finally:
        server.stop()


@dataclass
class Tiffin:
    runtime: Runtime
    url: str
    alerts: list[BusEvent] = field(default_factory=list)

    def integration(self, name: str) -> Any:
        return self.runtime.integrations.get_integration(name)


@pytest.fixture
async def tiffin(stack: Stack, compose_test: Callable[..., DictConfig]) -> AsyncIterator[Tiffin]:
    """A Runtime with the alertmanager integration (and so prometheus) on the real servers,
    served by uvicorn on the port both servers were told; every `alert.*` event collected."""
    cfg = compose_test(
        "integrations=[alertmanager]",
        f"integrations.alertmanager.settings.url={stack.alertmanager.url}",
        f"integrations.prometheus.settings.url={stack.prometheus.url}",
        f"server.http_port={stack.tiffin_port}",
    )
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    served = Tiffin(runtime, f"http://127.0.0.1:{stack.tiffin_port}")
    runtime.events.subscribe("alert.*", served.alerts.append)
    config = uvicorn.Config(
        create_app(runtime),
        host="127.0.0.1",
        port=stack.tiffin_port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    await runtime.start()
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or serving.done(), "uvicorn start", stack, 10)
        assert not serving.done(), "uvicorn stopped at once (port taken?)"
        yield served
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
        await runtime.stop()


async def until(
    condition: Callable[[], Any], what: str, stack: Stack, within: float = WAIT_S
) -> Any:
    """Poll `condition` (sync or async) until it returns something truthy; fail with the
    servers' logs."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within} s\n{stack.logs()}")
        await asyncio.sleep(0.1)


async def test_the_alertmanager_integration_checks_the_real_server(
    stack: Stack, tiffin: Tiffin
) -> None:
    alertmanager = tiffin.integration("alertmanager")
    prometheus = tiffin.integration("prometheus")
    assert isinstance(alertmanager, AlertmanagerIntegration)
    assert isinstance(prometheus, PrometheusIntegration)
    assert alertmanager.status is IntegrationStatus.active, alertmanager.last_error
    assert prometheus.config.because == "dependency of alertmanager"

    health = await alertmanager.health_check()
    assert health.healthy
    assert health.detail.startswith("healthy; ")
    assert isinstance(health.data["active_alerts"], int)
    assert TEST_ALERT not in health.data["active_alertnames"]

    async with httpx.AsyncClient(base_url=tiffin.url) as http:
        status = (await http.get("/integrations/alertmanager/status")).json()
    assert status["status"] == "active"
    assert status["settings"]["url"] == stack.alertmanager.url
    assert status["health"]["healthy"] is True
    assert status["dependencies"] == ["prometheus"]

    # Prometheus scrapes this Tiffin as the llm-platform job of monitoring/prometheus.yml, and
    # evaluates monitoring/'s rule files beside the test's.
    async def scraped() -> list[dict[str, Any]]:
        return [t for t in await prometheus.scrape_targets() if t["value"] == "1"]

    targets = await until(scraped, "successful scrape of Tiffin", stack, 30)
    assert [t["instance"] for t in targets] == [f"127.0.0.1:{stack.tiffin_port}"]
    async with httpx.AsyncClient(base_url=stack.prometheus.url) as http:
        rules = (await http.get("/api/v1/rules")).json()["data"]
    groups = {g["name"]: len(g["rules"]) for g in rules["groups"]}
    assert groups == {"llm-platform": 8, "llm-platform-recording": 7, "tiffin-end-to-end": 1}


async def test_a_firing_rule_reaches_tiffin_through_alertmanager_and_then_resolves(
    stack: Stack, tiffin: Tiffin
) -> None:
    def received(kind: str) -> dict[str, BusEvent]:
        """`alert.<kind>` events of the test alert, by the receiver that delivered them;
        empty until both receivers (critical: Tiffin's own and on-call) have delivered."""
        found = {
            e.data["receiver"]: e
            for e in tiffin.alerts
            if e.type == f"alert.{kind}" and e.data["alertname"] == TEST_ALERT
        }
        return found if len(found) == 2 else {}

    alertmanager = tiffin.integration("alertmanager")
    started = time.monotonic()
    with switch_on(stack):
        firing = await until(lambda: received("firing"), "alert.firing events", stack)
        fired_after = time.monotonic() - started
        health = await alertmanager.health_check()
        started = time.monotonic()
    resolved = await until(lambda: received("resolved"), "alert.resolved events", stack)
    resolved_after = time.monotonic() - started

    assert set(firing) == {"tiffin", "on-call"}
    event = firing["tiffin"]
    assert event.source == "alertmanager"
    assert event.data["severity"] == "critical"
    assert event.data["status"] == "firing"
    assert event.data["labels"] == {
        "alertname": TEST_ALERT,
        "severity": "critical",
        "job": SWITCH_JOB,
        "instance": f"127.0.0.1:{stack.switch_port}",
    }
    assert event.data["annotations"]["summary"] == "Tiffin end-to-end test alert"
    assert event.data["endsAt"] is None
    assert datetime.fromisoformat(event.data["startsAt"]).tzinfo is not None
    prometheus_port = stack.prometheus.url.rsplit(":", 1)[1]
    assert f":{prometheus_port}/graph?g0.expr=" in event.data["generatorURL"]
    assert event.data["fingerprint"] == firing["on-call"].data["fingerprint"]
    assert event.data["externalURL"] == stack.alertmanager.url
    assert TEST_ALERT in health.data["active_alertnames"]

    assert set(resolved) == {"tiffin", "on-call"}
    event = resolved["tiffin"]
    assert event.data["status"] == "resolved"
    assert event.data["fingerprint"] == firing["tiffin"].data["fingerprint"]
    assert event.data["startsAt"] == firing["tiffin"].data["startsAt"]
    assert event.data["endsAt"] is not None
    assert datetime.fromisoformat(event.data["endsAt"]) >= datetime.fromisoformat(
        event.data["startsAt"]
    )

    async with httpx.AsyncClient(base_url=tiffin.url) as http:
        status = (await http.get("/integrations/alertmanager/status")).json()
    latest = status["recent_alerts"][0]
    assert (latest["alertname"], latest["status"]) == (TEST_ALERT, "resolved")
    assert latest["summary"] == "Tiffin end-to-end test alert"
    print(f"\nalert fired after {fired_after:.1f} s, resolved after {resolved_after:.1f} s")

    # The recording rules work on Tiffin's real series (their labels match): the webhook's own
    # requests show up.
    prometheus = tiffin.integration("prometheus")
    webhook_rate = (
        'llm:requests_per_second:rate1m{job="llm-platform",endpoint="alertmanager_webhook",'
        'status="200"}'
    )
    # (Its value may be 0: a counter series born with all its requests shows no increase.)
    [recorded] = await until(lambda: prometheus.query(webhook_rate), "recorded rate", stack, 30)
    assert float(recorded["value"][1]) >= 0
    ratio = await until(
        lambda: prometheus.query('llm:request_error_ratio:rate5m{job="llm-platform"}'),
        "recorded error ratio",
        stack,
        30,
    )
    assert [float(r["value"][1]) for r in ratio] == [0.0]
