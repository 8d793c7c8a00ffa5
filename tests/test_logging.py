"""structlog configuration: JSON in prod, request ids, secrets masked."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from runtime.config_schema import LogFormat, LoggingConfig
from runtime.telemetry.logging import bind_request, configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    structlog.contextvars.clear_contextvars()
    configure_logging(LoggingConfig(level="WARNING"))


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_json_logs_carry_the_request_id_and_mask_secrets(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="INFO", format=LogFormat.json), stream=stream)
    bind_request("req-42")
    structlog.get_logger("tiffin.test").info(
        "calling upstream http://bob:s3cret@db.local/x",
        api_key="sk-live-123",
        settings={"password": "p4ss", "host": "db.local"},
        header="Bearer abc.def",
    )
    [record] = lines(stream)
    assert record["request_id"] == "req-42"
    assert record["level"] == "info"
    assert record["event"] == "calling upstream http://bob:***@db.local/x"
    assert record["api_key"] == "***"
    assert record["settings"] == {"password": "***", "host": "db.local"}
    assert record["header"] == "Bearer ***"
    assert "s3cret" not in stream.getvalue() and "p4ss" not in stream.getvalue()


def test_the_level_filters_and_console_format_is_not_json(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="WARNING", format=LogFormat.console), stream=stream)
    log = structlog.get_logger("tiffin.test")
    log.info("hidden")
    log.warning("shown", token="t-1")
    text = stream.getvalue()
    assert "hidden" not in text
    assert "shown" in text and "token=***" in text
    assert not text.startswith("{")


def test_reconfiguring_does_not_duplicate_lines(stream: io.StringIO) -> None:
    configure_logging(LoggingConfig(level="INFO", format=LogFormat.json), stream=stream)
    configure_logging(LoggingConfig(level="INFO", format=LogFormat.json), stream=stream)
    logging.getLogger("tiffin.stdlib").info("once")
    assert [r["event"] for r in lines(stream)] == ["once"]
