"""The Alertmanager webhook in-process (httpx ASGITransport): each alert of a notification
becomes an `alert.firing` / `alert.resolved` event and a log line; anything that is not a
notification is a 400 in OpenAI's error shape. And the alertmanager integration's memory of
them (its health against a real Alertmanager is in test_alerting.py)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import structlog

from runtime.app import Runtime
from runtime.events import BusEvent, EventBus
from runtime.integrations.alertmanager import (
    DEFAULT_ALERTMANAGERINTEGRATION_CONFIG,
    AlertmanagerIntegration,
)
from runtime.transports.http import create_app
from tests.conftest import free_port
from tests.test_http import assert_openai_error

MakeRuntime = Callable[..., Runtime]
WEBHOOK = "/integrations/alertmanager/webhook"

# A notification as Alertmanager 0.25 sends it: one firing critical alert, one resolved warning.
NOTIFICATION: dict[str, Any] = {
    "receiver": "tiffin",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "LLMHighGPUMemory",
                "gpu": "0",
                "instance": "gpu-box:3000",
                "job": "llm-platform",
                "severity": "critical",
            },
            "annotations": {
                "summary": "GPU 0 memory nearly full (98%) on gpu-box:3000",
                "description": "GPU 0 on gpu-box:3000 has used more than 97% of its memory.",
            },
            "startsAt": "2026-11-25T22:40:55.123456789Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
            "fingerprint": "6f8e4c4bd4d3b6a1",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "IntegrationDown", "name": "ollama", "severity": "warning"},
            "annotations": {"summary": "Integration ollama is down on a:3000"},
            "startsAt": "2026-11-25T22:30:00Z",
            "endsAt": "2026-11-25T22:41:00+00:00",
            "generatorURL": "",
            "fingerprint": "0a1b2c3d4e5f6789",
        },
    ],
    "groupLabels": {"alertname": "LLMHighGPUMemory"},
    "commonLabels": {"job": "llm-platform"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
    "version": "4",
    "groupKey": '{}:{alertname="LLMHighGPUMemory"}',
    "truncatedAlerts": 0,
}


@pytest.fixture
async def runtime(make_runtime: MakeRuntime) -> Runtime:
    runtime = make_runtime()
    await runtime.start()
    return runtime


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as http:
        yield http


async def test_each_alert_becomes_one_event_and_one_log_line(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    events: list[BusEvent] = []
    runtime.events.subscribe("alert.*", events.append)
    with structlog.testing.capture_logs() as logs:
        response = await client.post(WEBHOOK, json=NOTIFICATION)
    assert response.status_code == 200, response.text
    assert response.json() == {"received": 2, "firing": 1, "resolved": 1}

    firing, resolved = events
    assert (firing.type, firing.source) == ("alert.firing", "alertmanager")
    assert firing.data == {
        "alertname": "LLMHighGPUMemory",
        "severity": "critical",
        "status": "firing",
        "labels": NOTIFICATION["alerts"][0]["labels"],
        "annotations": NOTIFICATION["alerts"][0]["annotations"],
        "fingerprint": "6f8e4c4bd4d3b6a1",
        "startsAt": "2026-11-25T22:40:55.123456+00:00",
        "endsAt": None,  # Alertmanager's zero time: no end yet
        "generatorURL": "http://prometheus:9090/graph?g0.expr=...",
        "receiver": "tiffin",
        "groupKey": '{}:{alertname="LLMHighGPUMemory"}',
        "externalURL": "http://alertmanager:9093",
    }
    assert (resolved.type, resolved.source) == ("alert.resolved", "alertmanager")
    assert resolved.data["alertname"] == "IntegrationDown"
    assert resolved.data["severity"] == "warning"
    assert resolved.data["endsAt"] == "2026-11-25T22:41:00+00:00"

    alert_logs = [entry for entry in logs if entry["event"].startswith("alert ")]
    assert [(e["event"], e["log_level"], e["alertname"]) for e in alert_logs] == [
        ("alert firing", "warning", "LLMHighGPUMemory"),
        ("alert resolved", "info", "IntegrationDown"),
    ]
    assert alert_logs[0]["summary"] == "GPU 0 memory nearly full (98%) on gpu-box:3000"
    assert alert_logs[0]["severity"] == "critical"


async def test_unknown_fields_are_ignored_and_a_truncated_notification_is_logged(
    client: httpx.AsyncClient,
) -> None:
    body = {**copy.deepcopy(NOTIFICATION), "truncatedAlerts": 3, "newField": {"x": 1}}
    body["alerts"][0]["newAlertField"] = True
    with structlog.testing.capture_logs() as logs:
        response = await client.post(WEBHOOK, json=body)
    assert response.json()["received"] == 2
    [truncated] = [e for e in logs if e["event"] == "alertmanager truncated a notification"]
    assert truncated["truncated_alerts"] == 3


def broken(path: str, value: Any) -> dict[str, Any]:
    """NOTIFICATION with the field at dotted `path` set to `value` (or removed: ...)."""
    body = copy.deepcopy(NOTIFICATION)
    *parents, last = path.split(".")
    target: Any = body
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return body


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (broken("version", "3"), "version", "Input should be '4'"),
        (broken("version", ...), "version", "Field required"),
        (broken("receiver", ...), "receiver", "Field required"),
        (broken("alerts", {"a": 1}), "alerts", "Input should be a valid list"),
        (broken("alerts.0.status", "pending"), "alerts.0.status", "'firing' or 'resolved'"),
        (broken("alerts.1.labels", {"n": 1}), "alerts.1.labels.n", "valid string"),
        (broken("alerts.0.fingerprint", ""), "alerts.0.fingerprint", "at least 1 character"),
        (broken("alerts.0.startsAt", "yesterday"), "alerts.0.startsAt", "datetime"),
        (broken("alerts.0.startsAt", "2026-11-25T22:40:55"), "alerts.0.startsAt", "timezone"),
    ],
)
async def test_a_malformed_notification_is_a_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], param: str, message: str
) -> None:
    error = assert_openai_error(await client.post(WEBHOOK, json=body), 400, "invalid_request_error")
    assert error["param"] == param
    assert error["code"] == "invalid_value"
    assert error["message"].startswith(f"{param}: ") and message in error["message"]


async def test_a_body_that_is_not_a_notification_object_is_a_400(
    client: httpx.AsyncClient,
) -> None:
    assert_openai_error(await client.post(WEBHOOK, json=[1]), 400, "invalid_request_error")
    assert_openai_error(await client.post(WEBHOOK, content=b"{"), 400, "invalid_request_error")
    assert_openai_error(await client.post(WEBHOOK), 400, "invalid_request_error")
    get = assert_openai_error(await client.get(WEBHOOK), 405, "invalid_request_error")
    assert "GET" in get["message"]


async def test_the_integration_remembers_the_latest_alerts_newest_first() -> None:
    bus = EventBus()
    config = copy.deepcopy(DEFAULT_ALERTMANAGERINTEGRATION_CONFIG)
    config.settings["recent_alerts"] = 2
    integration = AlertmanagerIntegration(config, bus)
    for n in range(3):
        data = {"alertname": f"A{n}", "status": "firing", "annotations": {"summary": f"s{n}"}}
        await bus.publish(BusEvent("alert.firing", "alertmanager", data))
    await bus.publish(BusEvent("integration.started", "integrations", {"name": "x"}))
    recent = integration.describe()["recent_alerts"]
    assert [(r["alertname"], r["summary"]) for r in recent] == [("A2", "s2"), ("A1", "s1")]
    assert recent[0]["received_at"] > 0


async def test_initialize_fails_clearly_when_alertmanager_is_unreachable() -> None:
    config = copy.deepcopy(DEFAULT_ALERTMANAGERINTEGRATION_CONFIG)
    config.settings["url"] = f"http://127.0.0.1:{free_port()}"
    integration = AlertmanagerIntegration(config, EventBus())
    with pytest.raises(httpx.ConnectError):
        await integration.initialize()
    assert integration._client is None  # nothing left half-open for the next retry
    with pytest.raises(RuntimeError, match="alertmanager integration is not initialized"):
        await integration.active_alerts()
