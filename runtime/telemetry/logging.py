"""structlog setup from the config: console lines in dev, JSON in prod, request ids bound per
request (through contextvars), the current trace and span ids on every line logged inside a
traced request, and secrets masked in every event before it is rendered."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from runtime.config_schema import LogFormat, LoggingConfig
from runtime.secrets import is_secret_key, redact, redact_text


def _mask_secrets(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key == "event" and isinstance(value, str):
            event_dict[key] = redact_text(value)
        elif is_secret_key(key) and value:
            event_dict[key] = "***"
        else:
            event_dict[key] = redact(value, key)
    return event_dict


def _add_trace_ids(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The ids of the current span, when there is one and its trace is sampled: a line then
    links to a trace the backend has (BentoML's own span, never exported, is not sampled)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid and context.trace_flags.sampled:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def configure_logging(config: LoggingConfig, *, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger (BentoML, uvicorn and Hydra log there)."""
    level = logging.getLevelName(str(config.level).upper())
    if not isinstance(level, int):
        level = logging.INFO
    renderer: Any
    if config.format is LogFormat.json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
        _mask_secrets,
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler._tiffin = True  # type: ignore[attr-defined]
    # Tiffin's own loggers always render through this handler. Other libraries' records go to
    # the root logger: under BentoML that already has BentoML's handler, so we add ours to the
    # root only when nothing else is there (the CLI), and never print a line twice.
    root = logging.getLogger()
    own = logging.getLogger("tiffin")
    for logger in (root, own):
        for existing in list(logger.handlers):
            if getattr(existing, "_tiffin", False):
                logger.removeHandler(existing)
    own.addHandler(handler)
    own.propagate = False
    own.setLevel(level)
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(level)


def bind_request(request_id: str, **values: Any) -> None:
    """Bind the request id (and anything else) to every log line of the current request."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, **values)
