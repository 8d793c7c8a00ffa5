"""The database integration and the request log, on SQLite: migrations from empty, records
written after requests on the scripted engine, usage per key and model, flush on stop, and an
outage (the engine swapped for one that cannot connect) spooled to a file and replayed with
every record exactly once. tests/test_database_postgres.py does the outage on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from omegaconf import DictConfig
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runtime.app import Runtime, to_settings
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.integrations.base import IntegrationStatus
from runtime.integrations.database import (
    DEFAULT_DATABASEINTEGRATION_CONFIG,
    DatabaseIntegration,
    async_url,
)
from runtime.persistence import migrate
from runtime.persistence.request_log import RequestLogWriter, WriterSettings, to_row
from runtime.persistence.spool import Spool
from runtime.persistence.store import RequestLogStore
from runtime.persistence.tables import metadata
from runtime.response_store import MemoryResponses
from runtime.telemetry.live_stats import GenerationRequestRecord
from runtime.transports.http import create_app
from tests.conftest import eventually
from tests.test_openai_api import ScriptedEngines, chat

MakeRuntime = Callable[..., Runtime]
PRICES = {"prompt_per_1k": 1.0, "completion_per_1k": 1.0}


def database_overrides(data_dir: Path, url: str = "", **settings: object) -> list[str]:
    base = [
        "integrations=database",
        f"integrations.database.settings.data_dir={data_dir}",
        f"integrations.database.settings.url='{url}'",
        "integrations.database.settings.flush_interval_s=0.01",
        "integrations.database.settings.retry_interval_s=0.05",
    ]
    return base + [f"integrations.database.settings.{k}={v}" for k, v in settings.items()]


async def start_with_models(runtime: Runtime) -> Runtime:
    for model_id in ("m1", "m2"):
        config = ModelConfig(id=model_id, source="x", prices=PRICES)
        runtime.models.register(ModelSpec(config, Path("x"), "scripted", provider="local"))
    await runtime.start()
    return runtime


def database_of(runtime: Runtime) -> DatabaseIntegration:
    database = runtime.integrations.integrations["database"]
    assert isinstance(database, DatabaseIntegration)
    return database


@pytest.fixture
async def runtime(make_runtime: MakeRuntime, tmp_path: Path) -> Runtime:
    return await start_with_models(
        make_runtime(*database_overrides(tmp_path), builtins=[ScriptedEngines()])
    )


@pytest.fixture
async def http(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        yield client


async def test_migrations_create_the_schema_from_empty(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    try:
        assert await migrate.upgrade(engine) == migrate.head() == "0003"
        assert await migrate.upgrade(engine) == "0003"  # applied again: nothing to do

        def columns(connection: object) -> dict[str, set[str]]:
            inspector = inspect(connection)
            return {
                table: {c["name"] for c in inspector.get_columns(table)}
                for table in inspector.get_table_names()
                if table != "alembic_version"
            }

        async with engine.connect() as connection:
            found = await connection.run_sync(columns)
        # The migrations and the metadata the code uses describe the same tables.
        assert found == {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    finally:
        await engine.dispose()


async def test_requests_are_logged_and_summed_per_key_and_model(
    runtime: Runtime, http: httpx.AsyncClient
) -> None:
    database = database_of(runtime)
    assert database.status is IntegrationStatus.active
    sent = [
        await http.post("/v1/chat/completions", json=chat(model="m1")),
        await http.post("/v1/chat/completions", json=chat(model="m1", stream=True)),
        await http.post("/v1/chat/completions", json=chat(model="m2")),
    ]
    assert all(r.status_code == 200 for r in sent)
    await http.get("/v1/models")  # no model: not logged
    await eventually(lambda: database.writer.written == 3)
    rows = {row["request_id"]: row for row in await database.store.rows()}
    assert set(rows) == {r.headers["x-request-id"] for r in sent}
    streamed = rows[sent[1].headers["x-request-id"]]
    assert streamed["model"] == "m1" and streamed["provider"] == "local"
    assert streamed["transport"] == "http" and streamed["endpoint"] == "chat_completions"
    assert streamed["status"] == 200 and streamed["finish_reasons"] == "stop"
    assert streamed["prompt_tokens"] == 3 and streamed["completion_tokens"] == 1
    assert streamed["ttft_s"] is not None and streamed["latency_s"] > 0
    assert streamed["cost"] == pytest.approx(4 / 1000) and streamed["key_name"] is None

    status = (await http.get("/integrations/database/status")).json()
    assert status["request_log"]["written"] == 3 and status["health"]["healthy"]
    usage = (await http.get("/admin/usage")).json()
    by_model = {row["model"]: row for row in usage["usage"]}
    assert by_model["m1"]["requests"] == 2 and by_model["m2"]["requests"] == 1
    assert by_model["m1"]["completion_tokens"] == 2 and by_model["m1"]["errors"] == 0
    assert by_model["m1"]["cost"] == pytest.approx(8 / 1000)
    assert usage["until"] - usage["since"] == pytest.approx(86_400)
    later = await http.get("/admin/usage", params={"since": usage["until"] + 10})
    assert later.status_code == 400 and later.json()["error"]["param"] == "since"
    future = await http.get(
        "/admin/usage", params={"since": "2999-01-01T00:00:00Z", "until": "2999-01-02T00:00:00Z"}
    )
    assert future.json()["usage"] == []
    bad = await http.get("/admin/usage", params={"until": "tomorrow"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "until"


async def test_usage_is_per_api_key_and_needs_the_admin_scope(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    from tests.test_auth import ADMIN, APP, KEYS

    overrides = [*database_overrides(tmp_path), KEYS]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        for headers, model in ((APP, "m1"), (APP, "m1"), (ADMIN, "m2")):
            response = await client.post(
                "/v1/chat/completions", json=chat(model=model), headers=headers
            )
            assert response.status_code == 200
        assert (await client.get("/admin/usage", headers=APP)).status_code == 403
        usage = (await client.get("/admin/usage", headers=ADMIN)).json()["usage"]
    summary = {(row["key_name"], row["model"]): row["requests"] for row in usage}
    assert summary == {("app", "m1"): 2, ("ops", "m2"): 1}
    logged = json.dumps(await database_of(runtime).store.rows())
    assert "tk-app-planted" not in logged and "tk-admin-planted" not in logged


async def test_usage_needs_the_database_integration(make_runtime: MakeRuntime) -> None:
    runtime = make_runtime()
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        response = await client.get("/admin/usage")
    assert response.status_code == 503
    assert "integrations=database" in response.json()["error"]["message"]


async def test_stored_responses_live_in_the_database(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    """With the database, the Responses API's answers outlive the process (and so serve every
    worker): a new Runtime on the same database continues and deletes them, per key."""
    first = await start_with_models(
        make_runtime(*database_overrides(tmp_path), builtins=[ScriptedEngines()])
    )
    transport = httpx.ASGITransport(app=create_app(first))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        made = (await client.post("/v1/responses", json={"model": "m1", "input": "hi"})).json()
    await first.stop()
    assert isinstance(first.responses, MemoryResponses)  # stopped: no database to use

    second = await start_with_models(
        make_runtime(*database_overrides(tmp_path), builtins=[ScriptedEngines()])
    )
    transport = httpx.ASGITransport(app=create_app(second))
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        again = await client.get(f"/v1/responses/{made['id']}")
        assert again.status_code == 200 and again.json() == made
        follow = {"model": "m1", "input": "more", "previous_response_id": made["id"]}
        assert (await client.post("/v1/responses", json=follow)).status_code == 200
        engine = second.models.get("m1").engine
        assert [m["content"] for m in engine.requests[-1].messages] == ["hi", "ok", "more"]
        assert (await client.delete(f"/v1/responses/{made['id']}")).status_code == 200
        assert (await client.get(f"/v1/responses/{made['id']}")).status_code == 404
    await second.stop()


async def test_queued_records_are_flushed_on_stop(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    # Batches wait up to a minute to fill: only stopping writes these.
    overrides = database_overrides(tmp_path, flush_interval_s=60, batch_size=1000)
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        for _ in range(3):
            assert (await client.post("/v1/chat/completions", json=chat())).is_success
    database = database_of(runtime)
    assert database.writer.written == 0
    await runtime.stop()
    assert database.writer.written == 3 and not database.writer.spool.exists()
    reopened = RequestLogStore(create_async_engine(database.url))
    try:
        assert await reopened.count() == 3
    finally:
        await reopened.engine.dispose()


async def test_a_stream_aborted_by_the_drain_is_logged_before_stop_returns(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    plugin = ScriptedEngines()
    overrides = database_overrides(tmp_path, flush_interval_s=60, batch_size=1000)
    runtime = await start_with_models(make_runtime(*overrides, builtins=[plugin]))
    await runtime.models.load("m1")
    engine = plugin.built["m1"]
    engine.enqueue(["a", "b", "c"])
    engine.gate = gate = asyncio.Event()
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        request = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(stream=True)))
        await eventually(lambda: len(runtime.dispatcher.in_flight) == 1)
        drain = asyncio.ensure_future(runtime.drain(timeout_s=0.2))
        await eventually(runtime.dispatcher.abort.is_set)
        gate.set()
        assert await drain == 1
        request_id = (await request).headers["x-request-id"]
    database = database_of(runtime)
    await runtime.stop()
    reopened = RequestLogStore(create_async_engine(database.url))
    try:
        [row] = await reopened.rows()
    finally:
        await reopened.engine.dispose()
    assert row["request_id"] == request_id and row["finish_reasons"] == "abort"


async def test_an_outage_spools_and_every_record_arrives_once(
    runtime: Runtime, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    database = database_of(runtime)
    writer = database.writer
    ids = [(await http.post("/v1/chat/completions", json=chat())).headers["x-request-id"]]
    await eventually(lambda: writer.written == 1)

    working = database.store.engine
    database.store.engine = unreachable_engine(tmp_path)  # the database goes away
    for _ in range(4):
        ids.append((await http.post("/v1/chat/completions", json=chat())).headers["x-request-id"])
    await eventually(lambda: writer.spooled == 4)
    assert writer.down and writer.spool.exists()
    spooled = [json.loads(line) for line in writer.spool.path.read_text().splitlines()]
    assert [row["request_id"] for row in spooled] == ids[1:]
    with pytest.raises(Exception, match="unable to open database file"):
        await database.health_check()
    await database.store.engine.dispose()

    database.store.engine = working  # ... and comes back
    ids.append((await http.post("/v1/chat/completions", json=chat())).headers["x-request-id"])
    await eventually(lambda: not writer.spool.exists() and writer.written == 6)
    assert not writer.down
    rows = await database.store.rows()
    assert sorted(row["request_id"] for row in rows) == sorted(ids)
    health = await database.health_check()
    assert health.healthy and not health.degraded and health.data["spool_exists"] is False


async def test_a_replay_after_a_crash_mid_replay_inserts_nothing_twice(tmp_path: Path) -> None:
    store = RequestLogStore(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"))
    await migrate.upgrade(store.engine)
    writer = RequestLogWriter(store, Spool(tmp_path), WriterSettings(batch_size=2))
    try:
        records = [GenerationRequestRecord(f"r{i}", 1.0, "e", "http", "m", "p") for i in range(5)]
        for record in records:
            writer.record(record)
        await writer.flush()
        assert await store.count() == 5
        # Rows committed, but the process died before the spool was removed: replay again.
        committed = await store.rows()
        for row in committed:
            row.pop("time")
        writer.spool.path.write_text(
            "".join(json.dumps({**row, "time": 1.0}) + "\n" for row in committed)
            + '{"record_id": "cut sh'  # the last line was cut short by the crash
        )
        await writer.flush()
        assert await store.count() == 5 and not writer.spool.exists()
    finally:
        await writer.close()
        await store.engine.dispose()


async def test_records_before_the_database_started_are_spooled_then_replayed(
    tmp_path: Path,
) -> None:
    config = DEFAULT_DATABASEINTEGRATION_CONFIG
    settings = {**config.settings, "data_dir": str(tmp_path), "flush_interval_s": 0.01}
    database = DatabaseIntegration(type(config)(**{**vars(config), "settings": settings}))
    database.record_request(GenerationRequestRecord("early", 1.0, "e", "http", "m", "p"))
    assert database.writer.spool.exists()
    await database.initialize()
    try:
        assert [row["request_id"] for row in await database.store.rows()] == ["early"]
        assert not database.writer.spool.exists()
    finally:
        await database.shutdown()


async def test_spools_of_processes_that_are_gone_are_adopted_at_start(tmp_path: Path) -> None:
    # Workers sharing a data dir each spool to their own file; a live worker's file is its own.
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    live_pid = os.getppid()
    for pid, request_id in ((dead_pid, "from-a-crash"), (live_pid, "still-writing")):
        spool = Spool(tmp_path, pid=pid)
        spool.append([to_row(GenerationRequestRecord(request_id, 1.0, "e", "http", "m", "p"))])
    config = DEFAULT_DATABASEINTEGRATION_CONFIG
    settings = {**config.settings, "data_dir": str(tmp_path)}
    database = DatabaseIntegration(type(config)(**{**vars(config), "settings": settings}))
    await database.initialize()
    try:
        assert [row["request_id"] for row in await database.store.rows()] == ["from-a-crash"]
        assert Spool(tmp_path, pid=live_pid).path.exists()
        assert not Spool(tmp_path, pid=dead_pid).path.exists()
        assert not database.writer.spool.exists()
    finally:
        await database.shutdown()


def test_urls_get_async_drivers_and_status_masks_the_password(tmp_path: Path) -> None:
    assert async_url("", tmp_path) == f"sqlite+aiosqlite:///{tmp_path / 'tiffin.db'}"
    assert async_url("sqlite:////var/x.db", tmp_path) == "sqlite+aiosqlite:////var/x.db"
    pg = "postgresql://tiffin:s3cret-pw@db.internal:5432/tiffin"
    assert async_url(pg, tmp_path).startswith("postgresql+asyncpg://tiffin:s3cret-pw@")
    assert async_url("postgres://u:p@h/d", tmp_path).startswith("postgresql+asyncpg://")
    config = DEFAULT_DATABASEINTEGRATION_CONFIG
    settings = {**config.settings, "url": pg, "data_dir": str(tmp_path)}
    database = DatabaseIntegration(type(config)(**{**vars(config), "settings": settings}))
    described = json.dumps(database.describe())
    assert "s3cret-pw" not in described and "tiffin:***@db.internal" in described


def unreachable_engine(tmp_path: Path) -> AsyncEngine:
    """SQLite in a directory that does not exist: every connection fails."""
    return create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'gone' / 'x.db'}")


def test_the_yaml_and_the_exported_default_agree(
    compose_test: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("TIFFIN_DATA_DIR", raising=False)
    yaml = to_settings(compose_test("integrations=database")).integrations["database"]
    default = DEFAULT_DATABASEINTEGRATION_CONFIG
    assert (yaml._target_, yaml.type, yaml.priority, yaml.required) == (
        default._target_,
        default.type,
        default.priority,
        default.required,
    )
    assert {k: float(v) if isinstance(v, int) else v for k, v in yaml.settings.items()} == {
        k: float(v) if isinstance(v, int) else v for k, v in default.settings.items()
    }
