"""Graceful shutdown of a served `python -m runtime` (env=test, the default models): SIGTERM
while a stream is running. Within `server.drain_timeout_s` the stream ends normally; past it
the client gets a last chunk with finish_reason "abort" and `[DONE]`; either way the process
exits 0. A new request while it drains gets 503 (the service keeps uvicorn listening until
the drain is over, see bentos/service.py `Drain`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.served import Served

pytestmark = pytest.mark.slow

CHAT_MODEL = "gemma-3-270m"


def stream_through_sigterm(served: Served, max_tokens: int) -> tuple[list[str], str]:
    """Start a chat stream, send SIGTERM after its first token, probe a new request, then read
    the stream to its end. Returns the `data:` payloads and what the probe got."""
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Count from 1 to 5000, one number per line."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    frames: list[str] = []
    probe = ""
    with (
        httpx.Client(base_url=served.url, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            frames.append(line.removeprefix("data: "))
            if len(frames) == 3:  # the role chunk and two tokens: the generation is running
                served.process.send_signal(signal.SIGTERM)
                time.sleep(0.3)  # the signal reaches the worker through the BentoML arbiter
                try:
                    answer = httpx.post(
                        served.url + "/v1/chat/completions",
                        json={**body, "stream": False, "max_tokens": 2},
                        timeout=5,
                    )
                    probe = f"{answer.status_code} {answer.json()['error']['code']}"
                except httpx.TransportError as exc:
                    probe = type(exc).__name__
    return frames, probe


def finish_reasons(frames: list[str]) -> list[str]:
    return [
        choice["finish_reason"]
        for frame in frames
        if frame != "[DONE]"
        for choice in json.loads(frame)["choices"]
        if choice["finish_reason"]
    ]


def test_sigterm_lets_a_stream_finish_within_the_drain_timeout(tmp_path: Path) -> None:
    served = Served.start_default_models(
        tmp_path, "server.drain_timeout_s=60", "server.graceful_timeout_s=70"
    )
    try:
        served.wait_for("/readyz", 200, timeout=180)
        frames, probe = stream_through_sigterm(served, max_tokens=60)
        assert frames[-1] == "[DONE]"
        assert finish_reasons(frames) in (["length"], ["stop"])
        assert probe == "503 shutting_down"
        assert served.process.wait(timeout=60) == 0
    finally:
        served.kill()


def test_sigterm_past_the_drain_timeout_ends_the_stream_with_abort(tmp_path: Path) -> None:
    served = Served.start_default_models(
        tmp_path, "server.drain_timeout_s=1", "server.graceful_timeout_s=10"
    )
    try:
        served.wait_for("/readyz", 200, timeout=180)
        started = time.monotonic()
        frames, probe = stream_through_sigterm(served, max_tokens=2000)
        assert time.monotonic() - started < 30  # ended by the drain, not by 2000 tokens
        assert frames[-1] == "[DONE]"
        assert finish_reasons(frames) == ["abort"]
        assert not any('"error"' in frame for frame in frames)
        assert probe == "503 shutting_down"
        assert served.process.wait(timeout=60) == 0
        assert "drain timeout passed" in served.log.read_text()
    finally:
        served.kill()
