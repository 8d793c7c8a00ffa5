"""database: the request log, usage rollups and stored API keys in SQLite (default:
`<data_dir>/tiffin.db`) or PostgreSQL (`DATABASE_URL`), through SQLAlchemy 2's async engine;
Alembic migrations are applied when it starts. Each finished generation request (the record
LiveStats assembles from the `after_generate` and `request_finished` hooks) reaches
`record_request`, which only queues it: runtime/persistence/request_log.py batches, spools and
replays."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import KeyStore, RequestLogSink, ResponseStoreProvider
from runtime.integrations.settings import defaults_of
from runtime.persistence import migrate
from runtime.persistence.api_keys import ApiKeyStore
from runtime.persistence.request_log import RequestLogWriter, WriterSettings
from runtime.persistence.spool import Spool
from runtime.persistence.store import RequestLogStore
from runtime.persistence.stored_responses import DatabaseResponses
from runtime.secrets import redact, redact_text
from runtime.telemetry.live_stats import GenerationRequestRecord


@dataclass
class DatabaseSettings:
    """`integrations.database.settings`."""

    url: str = ""  # DATABASE_URL (postgresql://...); empty: SQLite under data_dir
    data_dir: str = ".tiffin/data"  # SQLite's file and the spool (TIFFIN_DATA_DIR)
    batch_size: int = 100  # request-log records written per transaction
    flush_interval_s: float = 0.5  # the longest a record waits for its batch
    queue_size: int = 10_000  # records waiting to be written; beyond it they spool to disk
    retry_interval_s: float = 2.0  # between attempts to reach a database that is down
    connect_timeout_s: float = 5.0  # asyncpg's connect timeout, SQLite's busy timeout


DEFAULT_DATABASEINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.database.DatabaseIntegration",
    name="database",
    type=IntegrationType.external_service,
    priority=10,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(DatabaseSettings),
)


def async_url(url: str, data_dir: Path) -> str:
    """The SQLAlchemy URL with an async driver: empty means SQLite under `data_dir`;
    `postgres://` and `postgresql://` use asyncpg, `sqlite://` aiosqlite."""
    if not url:
        return f"sqlite+aiosqlite:///{data_dir / 'tiffin.db'}"
    parsed = make_url(url)
    driver = {"postgres": "postgresql+asyncpg", "postgresql": "postgresql+asyncpg"}
    driver["sqlite"] = "sqlite+aiosqlite"
    if parsed.drivername in driver:
        parsed = parsed.set(drivername=driver[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


class Target:
    """Where the database integration's settings point: the data dir, the async URL, and an
    engine for it (building one connects to nothing; the first query does). The server and
    the `keys` CLI both use it, so they open the same database the same way."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        # The `keys` CLI passes the config's settings as they are: defaults filled in here.
        settings = {**defaults_of(DatabaseSettings), **settings}
        self.data_dir = Path(str(settings["data_dir"] or DatabaseSettings.data_dir)).expanduser()
        self.url = async_url(str(settings["url"] or ""), self.data_dir)
        # `timeout` is asyncpg's connect timeout and SQLite's busy timeout: a database that
        # hangs is soon "down".
        self.timeout = float(settings["connect_timeout_s"])

    def engine(self) -> AsyncEngine:
        return create_async_engine(
            self.url, pool_pre_ping=True, connect_args={"timeout": self.timeout}
        )

    def prepare(self) -> None:
        """Make the data dir SQLite's file goes into."""
        if self.url.startswith("sqlite"):
            self.data_dir.mkdir(parents=True, exist_ok=True)


class DatabaseIntegration(BaseIntegration, RequestLogSink, KeyStore, ResponseStoreProvider):
    """The request log's database: migrations at start, batched writes, `SELECT 1` health."""

    settings_schema: ClassVar[type[Any]] = DatabaseSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.target = Target(self.settings)
        self.data_dir, self.url = self.target.data_dir, self.target.url
        self.store = RequestLogStore(self.target.engine())
        writer_settings = WriterSettings(
            batch_size=int(self.settings["batch_size"]),
            flush_interval_s=float(self.settings["flush_interval_s"]),
            queue_size=int(self.settings["queue_size"]),
            retry_interval_s=float(self.settings["retry_interval_s"]),
        )
        self.writer = RequestLogWriter(self.store, Spool(self.data_dir), writer_settings)
        self.revision: str | None = None

    async def initialize(self) -> None:
        self.target.prepare()
        try:
            self.revision = await migrate.upgrade(self.store.engine)
        except Exception:
            await self.store.engine.dispose()
            raise
        self.writer.spool.adopt_orphans()  # what processes that are gone left behind
        self.writer.start()
        await self.writer.flush()  # replays what an earlier run (or an outage) spooled

    async def health_check(self) -> Health:
        await self.store.ping()
        state = self.writer.describe()
        data = {"revision": self.revision, "dialect": self.store.engine.dialect.name, **state}
        if self.writer.down:
            return Health(True, f"spooling: {self.writer.last_error}", data=data, degraded=True)
        return Health(True, f"SELECT 1 ok; {state['written']} records written", data=data)

    async def shutdown(self) -> None:
        """Write what is queued (to the spool if the database is down), then close the pool."""
        await self.writer.close()
        await self.store.engine.dispose()

    def api_keys(self) -> ApiKeyStore | None:
        """The stored API keys; None while the database integration is not running."""
        if not self.initialized:
            return None
        return ApiKeyStore(self.store.engine)

    def stored_responses(self, capacity: int) -> DatabaseResponses | None:
        """The Responses API's answers; None while the database integration is not running."""
        if not self.initialized:
            return None
        return DatabaseResponses(self.store.engine, capacity)

    def record_request(self, record: GenerationRequestRecord) -> None:
        """A finished generation request (LiveStats' sink). Before the database has started,
        or after it stopped, the record goes straight to the spool, to be replayed."""
        if self.writer.running:
            self.writer.record(record)
        else:
            self.writer.spool_now(record)

    async def usage(
        self, since: float, until: float | None = None, by: str | None = None
    ) -> list[dict[str, Any]]:
        """Usage per key and model over [since, until) (until: now), per hour or day with `by`."""
        return await self.store.usage(since, time.time() if until is None else until, by)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["database_url"] = redact_text(self.url)
        described["request_log"] = redact(self.writer.describe())
        return described
