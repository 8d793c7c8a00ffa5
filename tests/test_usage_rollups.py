"""Usage rollups per key, model and hour, kept by the request-log writer in the transaction of
each batch (a replayed spool never counts twice; migration 0002 rolls up older rows), and the
recent generation requests (`GET /admin/requests`, GraphQL `generationRequests`) read from the
database when it runs, from memory otherwise."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from runtime.app import Runtime
from runtime.persistence import migrate, rollups
from runtime.persistence.request_log import RequestLogWriter, WriterSettings, to_row
from runtime.persistence.spool import Spool
from runtime.persistence.store import RequestLogStore
from runtime.persistence.tables import request_log, usage_rollup
from runtime.telemetry.live_stats import GenerationRequestRecord
from tests.test_database import database_of, database_overrides, unreachable_engine
from tests.test_graphql import data
from tests.test_graphql import start as start_graphql
from tests.test_stored_keys import serve_http

MakeRuntime = Callable[..., Runtime]
HOUR = 3600.0
T0 = 1_800_000_000.0  # an hour boundary (divisible by 3600)


def record(
    request_id: str, at: float, key: str | None = "app", **fields: object
) -> dict[str, object]:
    made = GenerationRequestRecord(request_id, at, "chat_completions", "http", "m1", "local")
    made.key_name, made.status, made.latency_s = key, 200, 0.5
    made.prompt_tokens, made.completion_tokens, made.cost = 3, 2, 0.01
    for name, value in fields.items():
        setattr(made, name, value)
    return to_row(made)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RequestLogStore]:
    found = RequestLogStore(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}"))
    await migrate.upgrade(found.engine)
    yield found
    await found.engine.dispose()


async def rollup_rows(store: RequestLogStore) -> list[dict[str, object]]:
    query = sa.select(usage_rollup).order_by(usage_rollup.c.key_name, usage_rollup.c.bucket)
    async with store.engine.connect() as connection:
        return [dict(row._mapping) for row in await connection.execute(query)]


async def test_rollups_sum_per_key_model_and_hour(store: RequestLogStore) -> None:
    rows = [
        record("a", T0 + 10),
        record("b", T0 + 20, status=500, latency_s=1.5),
        record("c", T0 + HOUR + 5),
        record("d", T0 + 30, key=None),
    ]
    assert await store.insert(rows[:2]) == 2
    assert await store.insert(rows[2:]) == 2
    found = await rollup_rows(store)
    assert [(r["key_name"], r["bucket"], r["requests"]) for r in found] == [
        ("", T0, 1),
        ("app", T0, 2),
        ("app", T0 + HOUR, 1),
    ]
    first = found[1]
    assert first["errors"] == 1 and first["prompt_tokens"] == 6 and first["completion_tokens"] == 4
    assert (first["first_time"], first["last_time"]) == (T0 + 10, T0 + 20)
    assert first["cost"] == pytest.approx(0.02)
    usage = await store.usage(T0 + 1800, T0 + 2 * HOUR)  # counted from T0: whole hours
    by_key = {row["key_name"]: row for row in usage}
    assert by_key["app"]["requests"] == 3 and by_key["app"]["latency_avg_s"] == pytest.approx(
        2.5 / 3
    )
    assert by_key[None]["requests"] == 1
    assert await store.usage(T0 + HOUR, T0 + 2 * HOUR) == [{**usage[1], **later(usage[1])}]


def test_summed_rows_come_in_one_order_whatever_the_batch() -> None:
    # Workers upserting the same rollup rows in different orders can deadlock on PostgreSQL.
    rows = [
        record("a", T0 + HOUR, key="b"),
        record("b", T0 + 5, key="b"),
        record("c", T0 + 5, key="a", model="m2"),
        record("d", T0 + 5, key="a"),
    ]
    order = [(r["key_name"], r["model"], r["bucket"]) for r in rollups.summed(rows)]
    assert order == sorted(order) and len(order) == 4
    assert rollups.summed(rows) == rollups.summed(reversed(rows))


async def test_admin_usage_by_hour_and_day(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    runtime = make_runtime(*database_overrides(tmp_path))
    await runtime.start()
    day = 86_400.0
    await database_of(runtime).store.insert(
        [
            record("a", T0 + 10),
            record("b", T0 + HOUR + 10, latency_s=2.0),
            record("c", T0 + HOUR + 20, status=429),
            record("d", T0 + day + 10),
        ]
    )
    params = {"since": T0, "until": T0 + 2 * day}
    async with await serve_http(runtime) as http:
        total = (await http.get("/admin/usage", params=params)).json()
        hourly = (await http.get("/admin/usage", params={**params, "by": "hour"})).json()
        daily = (await http.get("/admin/usage", params={**params, "by": "day"})).json()
        bad = await http.get("/admin/usage", params={**params, "by": "week"})
    assert [row["requests"] for row in total["usage"]] == [4] and total["by"] is None
    assert [(r["period_start"], r["requests"], r["errors"]) for r in hourly["usage"]] == [
        (T0, 1, 0),
        (T0 + HOUR, 2, 1),
        (T0 + day, 1, 0),
    ]
    first_day = T0 // day * day
    assert [(r["period_start"], r["requests"]) for r in daily["usage"]] == [
        (first_day, 3),
        (first_day + day, 1),
    ]
    assert daily["usage"][0]["first"] == T0 + 10 and daily["usage"][0]["last"] == T0 + HOUR + 20
    assert daily["usage"][0]["prompt_tokens"] == 9
    assert [r["latency_avg_s"] for r in daily["usage"]] == [pytest.approx(1.0), 0.5]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"


def later(row: dict[str, object]) -> dict[str, object]:
    """The `app` row of the second hour alone."""
    return {
        "requests": 1,
        "errors": 0,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cost": pytest.approx(0.01),
        "latency_avg_s": 0.5,
        "first": T0 + HOUR + 5,
        "last": T0 + HOUR + 5,
    }


async def test_a_replayed_spool_is_not_counted_twice(
    store: RequestLogStore, tmp_path: Path
) -> None:
    writer = RequestLogWriter(store, Spool(tmp_path), WriterSettings(batch_size=2))
    rows = [record(f"r{i}", T0 + i) for i in range(5)]
    assert await store.insert(rows) == 5
    # Committed, but the process died before removing the spool: the replay inserts nothing.
    writer.spool.append(rows)
    await writer.flush()
    assert not writer.spool.exists()
    assert await store.insert([rows[0], record("new", T0 + 9)]) == 1
    [rollup] = await rollup_rows(store)
    assert rollup["requests"] == 6 and rollup["prompt_tokens"] == 18


async def test_migration_0002_rolls_up_rows_logged_before_it(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        assert await migrate.upgrade(engine, "0001") == "0001"
        async with engine.begin() as connection:
            await connection.execute(
                request_log.insert(), [record("x", T0 + 1), record("y", T0 + 2, key=None)]
            )
        assert await migrate.upgrade(engine) == migrate.head()
        usage = await RequestLogStore(engine).usage(T0, T0 + HOUR)
        assert [(row["key_name"], row["requests"]) for row in usage] == [(None, 1), ("app", 1)]
    finally:
        await engine.dispose()


# --- recent requests from the database --------------------------------------------------------


async def test_recent_requests_come_from_the_database(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    api = await start_graphql(make_runtime, *database_overrides(tmp_path))
    database = database_of(api.runtime)
    async with api.http:
        await api('mutation { generateText(model: "m1", prompt: "hi") { id } }')
        # Another worker's request, in the shared log only.
        earlier = time.time() - 60
        await database.store.insert([record("from-worker-2", earlier, finish_reasons=["stop"])])
        listed = (await api.http.get("/admin/requests", params={"limit": 5})).json()
        assert [r["id"] for r in listed][-1] == "from-worker-2"
        assert len(listed) == 2 and listed[0]["transport"] == "graphql"
        other = listed[-1]
        assert other["finish_reasons"] == ["stop"] and other["key_name"] == "app"
        assert set(other) == set(GenerationRequestRecord.__dataclass_fields__)
        answer = data(await api("{ generationRequests(limit: 5) { id model status cost } }"))
        assert [r["id"] for r in answer["generationRequests"]] == [r["id"] for r in listed]

        working = database.store.engine
        database.store.engine = unreachable_engine(tmp_path)  # down: this worker's, from memory
        try:
            fallback = (await api.http.get("/admin/requests")).json()
        finally:
            await database.store.engine.dispose()
            database.store.engine = working
        assert [r["transport"] for r in fallback] == ["graphql"]
        assert "from-worker-2" not in json.dumps(fallback)
