"""The request log on a real PostgreSQL: migrations at start, rows written after requests, and
PostgreSQL stopped mid-run: records spool while it is down and every one arrives exactly once
when it is back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.app import Runtime
from runtime.integrations.base import IntegrationStatus
from runtime.integrations.database import async_url
from runtime.persistence import migrate
from runtime.persistence.api_keys import KeyExists
from runtime.persistence.stored_responses import DatabaseResponses
from runtime.response_store import StoredResponse
from runtime.transports.http import create_app
from tests.conftest import eventually
from tests.real_postgres import Postgres, running_postgres
from tests.test_database import database_of, database_overrides, start_with_models
from tests.test_openai_api import ScriptedEngines, chat

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


async def test_postgres_outage_mid_run_loses_nothing(
    make_runtime: Callable[..., Runtime], postgres: Postgres, tmp_path: Path
) -> None:
    overrides = database_overrides(tmp_path, url=postgres.url)
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    database = database_of(runtime)
    writer = database.writer
    assert database.status is IntegrationStatus.active
    assert (
        database.store.engine.dialect.name == "postgresql" and database.revision == migrate.head()
    )
    assert "tiffin-test-pw" not in str(runtime.integrations.integrations["database"].describe())

    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    ids: list[str] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:

        async def send(count: int) -> None:
            for _ in range(count):
                response = await client.post("/v1/chat/completions", json=chat())
                assert response.status_code == 200  # requests never wait on the database
                ids.append(response.headers["x-request-id"])

        await send(3)
        await eventually(lambda: writer.written == 3, within=10)

        postgres.stop()
        await send(4)
        await eventually(lambda: writer.spooled == 4, within=10)
        assert writer.down and writer.spool.exists()
        with pytest.raises(OSError, match=r"(?i)connect"):
            await database.health_check()

        postgres.start()
        await send(2)
        await eventually(lambda: not writer.spool.exists() and writer.written == 9, within=20)
        usage = (await client.get("/admin/usage")).json()["usage"]

    rows = await database.store.rows()
    assert sorted(row["request_id"] for row in rows) == sorted(ids)  # each once, none lost
    assert usage == [
        {**usage[0], "key_name": None, "model": "m1", "requests": 9, "errors": 0},
    ]


async def test_workers_starting_together_migrate_one_at_a_time(postgres: Postgres) -> None:
    engines = [create_async_engine(async_url(postgres.url, Path())) for _ in range(3)]
    try:
        together = asyncio.gather(*(migrate.upgrade(engine) for engine in engines))
        revisions = await asyncio.wait_for(together, 60)  # unserialized, they can deadlock
        assert revisions == [migrate.head()] * 3
    finally:
        for engine in engines:
            await engine.dispose()


async def test_stored_keys_on_postgres(
    make_runtime: Callable[..., Runtime], postgres: Postgres, tmp_path: Path
) -> None:
    from tests.test_stored_keys import bearer, key_store, stored_key

    overrides = [*database_overrides(tmp_path, url=postgres.url), "auth.cache_ttl_s=0"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    store = key_store(runtime)
    key = await stored_key(store, "ci", "admin", tokens_per_minute=100)
    with pytest.raises(KeyExists):
        await store.create("ci", "0" * 64, ["inference"])
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiffin.test") as client:
        assert (await client.get("/v1/models")).status_code == 401
        answer = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert answer.status_code == 200, answer.text
        usage = (await client.get("/admin/usage", headers=bearer(key))).json()["usage"]
        assert [(row["key_name"], row["requests"]) for row in usage] == [("ci", 1)]
        assert await store.revoke("ci")
        assert (await client.get("/v1/models", headers=bearer(key))).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401  # revoked keys keep auth on
    await runtime.stop()  # before the server stops: last_used_at is written at stop


async def test_stored_responses_on_postgresql_keep_the_newest_per_capacity(
    postgres: Postgres,
) -> None:
    engine = create_async_engine(async_url(postgres.url, Path()))
    try:
        await migrate.upgrade(engine)
        store = DatabaseResponses(engine, capacity=2)
        for n in range(3):
            answer = {"id": f"resp_{n}", "output": []}
            await store.put(f"resp_{n}", StoredResponse("app", answer, [{"role": "user"}]))
        assert await store.get("resp_0", "app") is None  # the oldest beyond the capacity
        kept = await store.get("resp_2", "app")
        assert kept is not None and kept.body == {"id": "resp_2", "output": []}
        assert await store.get("resp_2", "someone-else") is None
        assert await store.delete("resp_2", "app") and not await store.delete("resp_2", "app")
    finally:
        await engine.dispose()
