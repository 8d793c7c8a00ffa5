"""`GET /admin/usage`: requests, tokens, cost and latency per API key and model over a time
range, read from the hourly usage rollups the request-log writer keeps in the database (every
worker's requests; one small row per key, model and hour, however many requests)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from runtime.dispatch import Context
from runtime.errors import quoted
from runtime.integrations import IntegrationUnavailable
from runtime.integrations.database import DatabaseIntegration
from runtime.persistence.rollups import BUCKET_S, PERIODS, bucket_of
from runtime.secrets import redact_text
from runtime.types import Event, HandlerError

DAY_S = 86_400.0


def moment(event: Event, name: str, default: float) -> float:
    """A time query parameter: unix seconds or ISO 8601 (`2026-11-26T00:00:00Z`)."""
    raw = event.query.get(name)
    if raw is None or raw == "":
        return default
    text = str(raw)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise HandlerError(
            400,
            f"{name}: expected unix seconds or an ISO 8601 time, got {quoted(text)}",
            param=name,
        ) from None


async def usage(event: Event, ctx: Context) -> dict[str, Any]:
    """Usage per key and model for requests that arrived in [`since`, `until`) (default: the
    last 24 hours): requests, errors, prompt/completion tokens, cost, mean latency. Counted by
    the hour: the hours that start in [`since` rounded down to the hour, `until`) are summed,
    and `counted_from` says where counting began. `by=hour` or `by=day` (UTC) splits each key
    and model's row into one per period, with its `period_start`."""
    until = moment(event, "until", time.time())
    since = moment(event, "since", until - DAY_S)
    if since >= until:
        raise HandlerError(400, "since must be before until", param="since")
    by = str(event.query.get("by") or "") or None
    if by is not None and by not in PERIODS:
        raise HandlerError(400, f"by: expected hour or day, got {quoted(by)}", param="by")
    try:
        database = ctx.integrations.require("database", DatabaseIntegration)
    except IntegrationUnavailable as exc:
        raise HandlerError(
            503,
            f"{exc}; start Tiffin with integrations=database to keep a request log",
            code="integration_unavailable",
        ) from None
    await database.writer.flush()  # what was just served is counted
    try:
        rows = await database.usage(since, until, by)
    except Exception as exc:
        raise HandlerError(
            503,
            f"the database is unavailable: {redact_text(str(exc))}",
            code="integration_unavailable",
        ) from None
    return {
        "since": since,
        "until": until,
        "bucket_s": BUCKET_S,
        "by": by,
        "counted_from": bucket_of(since),
        "usage": rows,
    }
