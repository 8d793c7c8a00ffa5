"""Stored API keys and usage rollups per key, model and hour (backfilled from the request log).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None

BUCKET_S = 3600.0


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("scopes", sa.String(256), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
        sa.Column("last_used_at", sa.Float, nullable=True),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("tokens_per_minute", sa.Integer, nullable=True),
    )
    op.create_index(
        "ux_api_keys_active_name",
        "api_keys",
        ["name"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    rollup = op.create_table(
        "usage_rollup",
        sa.Column("key_name", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("bucket", sa.Float, primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost", sa.Float, nullable=False),
        sa.Column("latency_s_sum", sa.Float, nullable=False),
        sa.Column("first_time", sa.Float, nullable=False),
        sa.Column("last_time", sa.Float, nullable=False),
    )
    _backfill(rollup)


def _backfill(rollup: sa.Table) -> None:
    """Roll up the rows logged before this revision (in Python: bucketing a float by the hour
    is spelled differently by each dialect)."""
    log = sa.table(
        "request_log",
        *(sa.column(name) for name in ("time", "key_name", "model", "status", "cost")),
        *(sa.column(name) for name in ("prompt_tokens", "completion_tokens", "latency_s")),
    )
    sums: dict[tuple[str, str, float], dict[str, float]] = {}
    for row in op.get_bind().execute(sa.select(log)).mappings():
        bucket = (row["key_name"] or "", row["model"], row["time"] // BUCKET_S * BUCKET_S)
        entry = sums.setdefault(
            bucket,
            dict.fromkeys(("requests", "errors", "prompt_tokens", "completion_tokens"), 0)
            | {"cost": 0.0, "latency_s_sum": 0.0, "first_time": row["time"]}
            | {"last_time": row["time"]},
        )
        entry["requests"] += 1
        entry["errors"] += int(row["status"] >= 400)
        entry["prompt_tokens"] += row["prompt_tokens"]
        entry["completion_tokens"] += row["completion_tokens"]
        entry["cost"] += row["cost"]
        entry["latency_s_sum"] += row["latency_s"]
        entry["first_time"] = min(entry["first_time"], row["time"])
        entry["last_time"] = max(entry["last_time"], row["time"])
    rows = [
        {"key_name": key, "model": model, "bucket": bucket, **entry}
        for (key, model, bucket), entry in sums.items()
    ]
    if rows:
        op.bulk_insert(rollup, rows)


def downgrade() -> None:
    op.drop_table("usage_rollup")
    op.drop_index("ux_api_keys_active_name", "api_keys")
    op.drop_table("api_keys")
