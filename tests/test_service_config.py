"""The BentoML service's own settings, read from the composed config."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from bentos.service import build_service


def test_bentoml_middleware_follows_the_config(compose_test: Callable[..., DictConfig]) -> None:
    """`logging.access_log: false` turns BentoML's access log off (the key did nothing before),
    and BentoML's own OpenTelemetry middleware, whose spans are never sampled, is off for every
    path: it made a span for each chunk of a stream."""
    quiet = build_service(compose_test("logging.access_log=false"))
    assert quiet.config["logging"]["access"]["enabled"] is False
    assert quiet.config["tracing"]["excluded_urls"] == [".*"]
    loud = build_service(compose_test("logging.access_log=true"))
    assert loud.config["logging"]["access"]["enabled"] is True
