"""The tables, as SQLAlchemy Core metadata. The migrations (migrations/versions) create them;
these definitions are what the writer and the usage query use, and a test checks the two agree."""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

# One row per request that used a model: GenerationRequestRecord (runtime/telemetry/live.py).
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
