"""grafana: Tiffin's dashboards in a Grafana, set up through its HTTP API.

At start it makes sure Grafana has the Prometheus datasource the dashboards query (uid
`tiffin-prometheus`, pointing at `prometheus_url`), the folder (`folder`), and the four dashboards
of `dashboards.py` beside it. A dashboard is written only when it is missing or its content
marker differs from the one built here, so starting again changes nothing. Health is
`/api/health` (Grafana's version, and whether its database answers).

    grafana = manager.get_integration("grafana")
    summary = await grafana.import_dashboards()   # created / updated / unchanged / provisioned

The API key is sent as `Authorization: Bearer ...` and appears nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.grafana.dashboards import build_dashboards
from runtime.integrations.grafana.panels import DATASOURCE_NAME, DATASOURCE_UID, content_marker
from runtime.integrations.grafana.provisioning import FOLDER, FOLDER_UID, SCRAPE_INTERVAL
from runtime.integrations.settings import defaults_of


@dataclass
class GrafanaSettings:
    """`integrations.grafana.settings`."""

    url: str = "http://localhost:3001"  # the Grafana server (GRAFANA_URL)
    api_key: str = ""  # a service account token (GRAFANA_API_KEY), sent as a bearer token
    prometheus_url: str = "http://localhost:9090"  # where Grafana reaches Prometheus
    timeout: float = 10.0  # seconds for one call to its API
    folder: str = FOLDER  # the dashboards' folder; '' puts them in Grafana's root
    datasource_name: str = DATASOURCE_NAME


DEFAULT_GRAFANAINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.grafana.GrafanaIntegration",
    name="grafana",
    type=IntegrationType.monitoring,
    priority=25,
    dependencies=["prometheus"],
    health_check_interval=60.0,
    retry_config=RetryConfig(max_retries=2, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(GrafanaSettings),
)


class GrafanaError(RuntimeError):
    """Grafana refused or could not do what the integration asked."""


@dataclass(frozen=True)
class DashboardImport:
    """What one import did, by dashboard uid."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # Provisioned from files in Grafana: read-only through the API, so left as they are.
    provisioned: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[str]]:
        return {
            "created": list(self.created),
            "updated": list(self.updated),
            "unchanged": list(self.unchanged),
            "provisioned": list(self.provisioned),
        }


class GrafanaIntegration(BaseIntegration):
    """Keeps Tiffin's datasource, folder and dashboards in a Grafana current."""

    settings_schema: ClassVar[type[Any]] = GrafanaSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.url = str(self.settings["url"]).rstrip("/")
        self.prometheus_url = str(self.settings["prometheus_url"])
        self.timeout = float(self.settings["timeout"])
        self.folder = str(self.settings["folder"] or "")
        self.datasource_name = str(self.settings["datasource_name"] or DATASOURCE_NAME)
        self._has_key = bool(self.settings["api_key"])
        self._client: httpx.AsyncClient | None = None
        self.version: str | None = None
        self.datasource: str | None = None  # what ensure_datasource did
        self.last_import: DashboardImport | None = None

    async def initialize(self) -> None:
        headers = {"Accept": "application/json"}
        if self._has_key:
            headers["Authorization"] = f"Bearer {self.settings['api_key']}"
        self._client = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(self.timeout, connect=5.0)
        )
        try:
            await self._health()
            self.datasource = await self.ensure_datasource()
            if self.folder:
                await self.ensure_folder()
            await self.import_dashboards()
        except Exception:
            await self.shutdown()
            raise

    async def health_check(self) -> Health:
        database = await self._health()
        detail = f"Grafana {self.version}, database {database}"
        return Health(True, detail, data={"version": self.version, "database": database})

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    # --- what it sets up ----------------------------------------------------------------------

    async def ensure_datasource(self) -> str:
        """Create or correct the Prometheus datasource the dashboards query; returns what it
        did: created, updated, unchanged, or read-only (provisioned from a file: left alone)."""
        wanted: dict[str, Any] = {
            "uid": DATASOURCE_UID,
            "name": self.datasource_name,
            "type": "prometheus",
            "access": "proxy",
            "url": self.prometheus_url,
            "jsonData": {"httpMethod": "POST", "timeInterval": SCRAPE_INTERVAL},
        }
        path = f"/api/datasources/uid/{DATASOURCE_UID}"
        existing = await self._call("GET", path, missing_ok=True)
        if existing is None:
            await self._call("POST", "/api/datasources", {**wanted, "isDefault": False})
            return "created"
        stored_json = existing.get("jsonData") or {}
        same = all(existing.get(k) == v for k, v in wanted.items() if k != "jsonData") and all(
            stored_json.get(k) == v for k, v in wanted["jsonData"].items()
        )
        if same:
            return "unchanged"
        if existing.get("readOnly"):
            self.log.warning(
                "datasource is provisioned from a file; not changing it",
                uid=DATASOURCE_UID,
                url=existing.get("url"),
                wanted_url=self.prometheus_url,
            )
            return "read-only"
        update = {
            **wanted,
            "isDefault": bool(existing.get("isDefault")),
            "jsonData": {**stored_json, **wanted["jsonData"]},
        }
        await self._call("PUT", path, update)
        return "updated"

    async def ensure_folder(self) -> str:
        """Create the dashboards' folder (uid `tiffin`), or give it the configured title."""
        path = f"/api/folders/{FOLDER_UID}"
        existing = await self._call("GET", path, missing_ok=True)
        if existing is None:
            await self._call("POST", "/api/folders", {"uid": FOLDER_UID, "title": self.folder})
            return "created"
        if existing.get("title") == self.folder:
            return "unchanged"
        body = {"title": self.folder, "version": existing.get("version"), "overwrite": True}
        await self._call("PUT", path, body)
        return "updated"

    async def import_dashboards(self) -> DashboardImport:
        """Write each dashboard that Grafana lacks or holds in another version (by its content
        marker, or another folder); publish the summary as a `grafana.dashboards` event."""
        summary = DashboardImport()
        folder_uid = FOLDER_UID if self.folder else ""
        for model in build_dashboards():
            uid = model["uid"]
            stored = await self._call("GET", f"/api/dashboards/uid/{uid}", missing_ok=True)
            if stored is None:
                summary.created.append(uid)
            else:
                meta = stored.get("meta") or {}
                if meta.get("provisioned"):
                    summary.provisioned.append(uid)
                    continue
                same_folder = (meta.get("folderUid") or "") == folder_uid
                if same_folder and content_marker(stored["dashboard"]) == content_marker(model):
                    summary.unchanged.append(uid)
                    continue
                summary.updated.append(uid)
            body = {
                "dashboard": {**model, "id": None},
                "folderUid": folder_uid,
                "overwrite": True,
                "message": f"Tiffin: {content_marker(model)}",
            }
            await self._call("POST", "/api/dashboards/db", body)
        self.last_import = summary
        self.log.info("grafana dashboards", **summary.to_dict())
        await self.emit("grafana.dashboards", summary.to_dict())
        return summary

    # --- HTTP ---------------------------------------------------------------------------------

    async def _health(self) -> str:
        body = await self._call("GET", "/api/health")
        self.version = str(body.get("version") or "unknown")
        database = str(body.get("database") or "unknown")
        if database != "ok":
            raise GrafanaError(f"Grafana at {self.url} reports its database as {database!r}")
        return database

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        missing_ok: bool = False,
    ) -> Any:
        """One API call; the JSON answer, None for a 404 when `missing_ok`, else GrafanaError."""
        try:
            response = await self._http().request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise GrafanaError(
                f"Grafana at {self.url} cannot be reached: {type(exc).__name__}: {exc}"
            ) from None
        status = response.status_code
        if status == 404 and missing_ok:
            return None
        if status == 401:
            raise GrafanaError(self._unauthorized(method, path))
        if status == 403:
            raise GrafanaError(
                f"Grafana at {self.url} denied {method} {path} (403): the API key's service "
                "account needs the Admin role for datasources (Editor for folders and dashboards)"
            )
        if not response.is_success:
            raise GrafanaError(
                f"Grafana at {self.url} answered {status} to {method} {path}: {_message(response)}"
            )
        try:
            return response.json()
        except ValueError:
            raise GrafanaError(f"Grafana at {self.url} sent no JSON for {method} {path}") from None

    def _unauthorized(self, method: str, path: str) -> str:
        where = f"Grafana at {self.url}"
        setting = "GRAFANA_API_KEY (integrations.grafana.settings.api_key)"
        if self._has_key:
            return (
                f"{where} refused the API key (401 on {method} {path}): check {setting}; "
                "it must be a service account token of that Grafana"
            )
        return f"{where} requires an API key (401 on {method} {path}): set {setting}"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the grafana integration is not initialized")
        return self._client

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["version"] = self.version
        described["datasource"] = {"uid": DATASOURCE_UID, "last_action": self.datasource}
        described["dashboards"] = self.last_import.to_dict() if self.last_import else None
        return described


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and body.get("message"):
        status = f" ({body['status']})" if body.get("status") else ""
        return f"{body['message']}{status}"
    return str(body)[:200]
