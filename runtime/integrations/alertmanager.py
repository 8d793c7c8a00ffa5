"""alertmanager: the Alertmanager that Prometheus sends Tiffin's alerts to
(`monitoring/llm_platform_rules.yml`), and that sends them back to Tiffin's webhook
(`POST /integrations/alertmanager/webhook`, `handlers/alerts.py`; `monitoring/alertmanager.yml`).

Health is Alertmanager's `/-/healthy` plus how many alerts it holds active (`/api/v2/alerts`).
The webhook publishes one `alert.firing` or `alert.resolved` event per alert whether or not this
integration is selected; when it is, it keeps the latest of them for its status page.

It depends on prometheus: without the server that evaluates the rules no alert arrives, so
Alertmanager alone is `degraded`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.events import BusEvent, EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.settings import defaults_of
from runtime.secrets import redact


@dataclass
class AlertmanagerSettings:
    """`integrations.alertmanager.settings`."""

    url: str = "http://localhost:9093"  # the Alertmanager server (ALERTMANAGER_URL)
    timeout: float = 5.0  # seconds for one call to its API
    recent_alerts: int = 20  # received alerts listed on its status, newest first


DEFAULT_ALERTMANAGERINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.alertmanager.AlertmanagerIntegration",
    name="alertmanager",
    type=IntegrationType.monitoring,
    priority=25,
    dependencies=["prometheus"],
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=2, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(AlertmanagerSettings),
)

# What is kept of each alert event for the status page (labels and annotations stay on the bus).
_KEPT = ("alertname", "severity", "status", "fingerprint", "startsAt", "endsAt", "receiver")


class AlertmanagerIntegration(BaseIntegration):
    """Health of the Alertmanager server, its active alerts, and the alerts Tiffin received."""

    settings_schema: ClassVar[type[Any]] = AlertmanagerSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.url = str(self.settings["url"]).rstrip("/")
        self.timeout = float(self.settings["timeout"])
        self.recent_alerts: deque[dict[str, Any]] = deque(
            maxlen=max(int(self.settings["recent_alerts"]), 1)
        )
        self._client: httpx.AsyncClient | None = None
        # Webhook deliveries count even while Alertmanager's API is unreachable, so this listens
        # for the object's whole life, not only between initialize and shutdown.
        self.bus.subscribe("alert.*", self._remember)

    async def initialize(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        try:
            await self._healthy()
        except Exception:
            await self.shutdown()
            raise

    async def health_check(self) -> Health:
        await self._healthy()
        active = await self.active_alerts()
        names = sorted({str(a.get("labels", {}).get("alertname", "")) for a in active} - {""})
        detail = f"healthy; {len(active)} active alert(s)"
        if names:
            detail += f": {', '.join(names)}"
        data = {
            "active_alerts": len(active),
            "active_alertnames": names,
            "recent_alerts": self._recent(5),
        }
        return Health(True, detail, data=data)

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def active_alerts(self) -> list[dict[str, Any]]:
        """Alerts Alertmanager holds now that are neither silenced nor inhibited (API v2)."""
        params = {"active": "true", "silenced": "false", "inhibited": "false"}
        response = await self._http().get("/api/v2/alerts", params=params)
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, list):
            raise RuntimeError(f"alertmanager at {self.url}: /api/v2/alerts answered {body!r}")
        return body

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "recent_alerts": self._recent()}

    def _recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The latest alerts received through the webhook, newest first."""
        latest = list(reversed(self.recent_alerts))[:limit]
        return [redact(entry) for entry in latest]

    def _remember(self, event: BusEvent) -> None:
        if event.type not in ("alert.firing", "alert.resolved"):
            return
        entry = {key: event.data.get(key) for key in _KEPT}
        entry["summary"] = dict(event.data.get("annotations") or {}).get("summary")
        entry["received_at"] = event.time
        self.recent_alerts.append(entry)

    async def _healthy(self) -> None:
        response = await self._http().get("/-/healthy")
        if response.status_code != 200:
            status = response.status_code
            raise RuntimeError(f"alertmanager at {self.url} is not healthy ({status})")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the alertmanager integration is not initialized")
        return self._client
