"""Usage rollups: the request-log rows of one batch summed per key, model and hour, and the
upsert that adds them to `usage_rollup` (ON CONFLICT ... DO UPDATE on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from runtime.persistence.tables import usage_rollup

BUCKET_S = 3600.0
_SUMMED = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost", "latency_s_sum")


def bucket_of(at: float) -> float:
    return at // BUCKET_S * BUCKET_S


def summed(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One rollup row per (key, model, hour) of `rows` (request-log rows), sorted by that key:
    concurrent workers then upsert (and lock) rollup rows in one order, never deadlocking on
    PostgreSQL."""
    sums: dict[tuple[str, str, float], dict[str, Any]] = {}
    for row in rows:
        at = float(row["time"])
        bucket = (row["key_name"] or "", row["model"], bucket_of(at))
        entry = sums.get(bucket)
        if entry is None:
            entry = sums[bucket] = dict.fromkeys(_SUMMED, 0) | {"first_time": at, "last_time": at}
        entry["requests"] += 1
        entry["errors"] += int(int(row["status"]) >= 400)
        entry["prompt_tokens"] += int(row["prompt_tokens"])
        entry["completion_tokens"] += int(row["completion_tokens"])
        entry["cost"] += float(row["cost"])
        entry["latency_s_sum"] += float(row["latency_s"])
        entry["first_time"] = min(entry["first_time"], at)
        entry["last_time"] = max(entry["last_time"], at)
    return [
        {"key_name": key, "model": model, "bucket": bucket, **entry}
        for (key, model, bucket), entry in sorted(sums.items())
    ]


async def add(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """Add the sums of `rows` to the rollups, in the caller's transaction."""
    if not rows:
        return
    dialect = connection.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(usage_rollup)
    c, new = usage_rollup.c, statement.excluded
    updates: dict[str, Any] = {name: c[name] + new[name] for name in _SUMMED}
    updates["first_time"] = case(
        (new.first_time < c.first_time, new.first_time), else_=c.first_time
    )
    updates["last_time"] = case((new.last_time > c.last_time, new.last_time), else_=c.last_time)
    upsert = statement.on_conflict_do_update(
        index_elements=[c.key_name, c.model, c.bucket], set_=updates
    )
    await connection.execute(upsert, rows)


PERIODS = {"hour": BUCKET_S, "day": 86_400.0}


async def usage(
    connection: AsyncConnection, since: float, until: float, by: str | None = None
) -> list[dict[str, Any]]:
    """Sums per key and model over the hours that start in [bucket_of(since), until); with
    `by` ("hour" or "day", UTC) one row per key, model and period, with its `period_start`."""
    c = usage_rollup.c
    groups: list[Any] = [c.key_name, c.model] + ([c.bucket] if by else [])
    query = (
        select(
            *groups,
            func.sum(c.requests).label("requests"),
            func.sum(c.errors).label("errors"),
            func.sum(c.prompt_tokens).label("prompt_tokens"),
            func.sum(c.completion_tokens).label("completion_tokens"),
            func.sum(c.cost).label("cost"),
            func.sum(c.latency_s_sum).label("latency_s_sum"),
            func.min(c.first_time).label("first"),
            func.max(c.last_time).label("last"),
        )
        .where(c.bucket >= bucket_of(since), c.bucket < until)
        .group_by(*groups)
        .order_by(*groups)
    )
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in await connection.execute(query):
        entry = dict(row._mapping)
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens"):
            entry[name] = int(entry[name] or 0)
        for name in ("cost", "latency_s_sum", "first", "last"):
            entry[name] = float(entry[name] or 0.0)
        entry["key_name"] = entry["key_name"] or None
        if by:
            period = PERIODS[by]
            entry["period_start"] = float(entry.pop("bucket")) // period * period
        key = (entry["key_name"] or "", entry["model"], entry.get("period_start"))
        if key in merged:  # another hour of the same day
            _merge(merged[key], entry)
        else:
            merged[key] = entry
    found = []
    for entry in merged.values():
        latency = entry.pop("latency_s_sum")
        entry["latency_avg_s"] = latency / entry["requests"] if entry["requests"] else 0.0
        found.append(entry)
    return found


def _merge(into: dict[str, Any], entry: dict[str, Any]) -> None:
    for name in _SUMMED:
        if name in entry:
            into[name] += entry[name]
    into["first"] = min(into["first"], entry["first"])
    into["last"] = max(into["last"], entry["last"])
