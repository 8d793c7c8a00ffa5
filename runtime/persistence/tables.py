"""The tables, as SQLAlchemy Core metadata. The migrations (migrations/versions) create them;
these definitions are what the writer and the usage query use, and a test checks the two agree."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text, text

metadata = MetaData()

# One row per request that used a model: GenerationRequestRecord (runtime/telemetry/live_stats.py).
# `record_id` is made when the record is queued, so a replayed spool inserts each row once.
request_log = Table(
    "request_log",
    metadata,
    Column("record_id", String(36), primary_key=True),
    Column("request_id", String(128), nullable=False),
    Column("time", Float, nullable=False),  # unix seconds when the request arrived
    Column("key_name", String(128), nullable=True),
    Column("model", String(256), nullable=False),
    Column("provider", String(128), nullable=False),
    Column("transport", String(32), nullable=False),
    Column("endpoint", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_s", Float, nullable=False),
    Column("ttft_s", Float, nullable=True),
    Column("status", Integer, nullable=False),
    Column("cost", Float, nullable=False),
    Column("finish_reasons", Text, nullable=False),  # comma-separated
    Index("ix_request_log_time", "time"),
    Index("ix_request_log_key_model", "key_name", "model"),
)

# API keys issued by `python -m runtime keys create`: the SHA-256 digest, never the key. A name
# is unique among active keys (a revoked key's name may be issued again); NULL limits mean
# `auth.limits`. `last_used_at` is written in the background, at most once a minute per key.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("scopes", String(256), nullable=False),  # comma-separated
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
    Column("last_used_at", Float, nullable=True),
    Column("requests_per_minute", Integer, nullable=True),
    Column("tokens_per_minute", Integer, nullable=True),
    Index(
        "ux_api_keys_active_name",
        "name",
        unique=True,
        sqlite_where=text("revoked_at IS NULL"),
        postgresql_where=text("revoked_at IS NULL"),
    ),
)

# Usage per key, model and hour, kept by the request-log writer in the transaction that inserts
# the rows (only rows actually inserted count, so a replayed spool never counts twice).
# `key_name` is '' for requests without a key: NULLs would never conflict in the upsert.
usage_rollup = Table(
    "usage_rollup",
    metadata,
    Column("key_name", String(128), primary_key=True),
    Column("model", String(256), primary_key=True),
    Column("bucket", Float, primary_key=True),  # unix seconds the hour starts
    Column("requests", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost", Float, nullable=False),
    Column("latency_s_sum", Float, nullable=False),
    Column("first_time", Float, nullable=False),
    Column("last_time", Float, nullable=False),
)

# The Responses API's stored answers (runtime/response_store.py), for previous_response_id and
# GET /v1/responses/{id} on every worker and replica. JSON text: the response object, and the
# conversation up to and including it. The oldest rows beyond limits.stored_responses go.
responses = Table(
    "responses",
    metadata,
    Column("id", String(160), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("body", Text, nullable=False),
    Column("conversation", Text, nullable=False),
    Index("ix_responses_created_at", "created_at"),
)
