"""The Batch API end to end on a served `python -m runtime` with the default models, lines on a
real Redis: the official `openai` client's files.create, batches.create, batches.retrieve and
files.content, for chat and embedding lines; then the fault test: the server is killed
(SIGKILL, every process) mid-batch and started again, and every line ends with exactly one
result."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.real_redis import RedisServer, running_redis
from tests.served import Served

pytestmark = pytest.mark.slow

LINES = 24


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


def overrides(workdir: Path, redis_url: str) -> list[str]:
    return [
        "integrations=[custom_models,redis,queue]",
        f"integrations.redis.settings.url={redis_url}",
        f"integrations.object_storage.settings.root={workdir / 'objects'}",
        # A line its worker took and never acked (the worker died) goes to another after 3 s.
        "integrations.queue.settings.redeliver_after_s=3",
        "batch.poll_s=0.2",
    ]


def start(workdir: Path, redis_url: str) -> Served:
    served = Served.start_default_models(workdir, *overrides(workdir, redis_url))
    served.wait_for("/readyz", 200, timeout=180)
    return served


def read_jsonl(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def wait_final(client: OpenAI, batch_id: str, within: float = 240) -> Any:
    deadline = time.monotonic() + within
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.3)


def test_a_batch_survives_its_server_being_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    served = start(tmp_path, redis_server.url)
    try:
        client = OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        # Embedding lines first: a quick batch of another endpoint.
        texts = [
            {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-minilm-l6-v2", "input": f"text {i}"},
            }
            for i in range(3)
        ]
        upload = client.files.create(
            file=("emb.jsonl", "\n".join(json.dumps(t) for t in texts).encode()), purpose="batch"
        )
        embedded = wait_final(
            client,
            client.batches.create(
                input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
            ).id,
        )
        assert embedded.status == "completed"
        vectors = read_jsonl(client, embedded.output_file_id)
        assert len(vectors[0]["response"]["body"]["data"][0]["embedding"]) == 384
        # The chat batch, killed midway.
        lines = [
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gemma-3-270m", "max_tokens": 24, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Write about {i} cats."}]}}
            for i in range(LINES)
        ]  # fmt: skip
        upload = client.files.create(
            file=("chat.jsonl", "\n".join(json.dumps(x) for x in lines).encode()),
            purpose="batch",
        )
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 120
        while (before := client.batches.retrieve(batch.id).request_counts.completed) < 3:
            assert time.monotonic() < deadline, "no line finished"
            time.sleep(0.1)
    finally:
        served.kill()  # SIGKILL: lines it had taken stay unacked in Redis
    served = start(tmp_path, redis_server.url)
    try:
        client = OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        done = wait_final(client, batch.id)
        assert done.status == "completed", done
        output = read_jsonl(client, done.output_file_id)
        errors = read_jsonl(client, done.error_file_id)
        ids = [line["custom_id"] for line in output + errors]
        assert sorted(ids) == sorted(f"c{i}" for i in range(LINES)), ids  # each exactly once
        assert (done.request_counts.completed, done.request_counts.failed) == (
            len(output),
            len(errors),
        )
        assert not errors, errors
        for line in output:
            assert line["response"]["status_code"] == 200
        # Lines the killed server had taken and not acked ran again here, after 3 s.
        # At most what it could hold (batch.concurrency): the restarted server's own slow lines
        # are never taken from it.
        again = served.log.read_text().count("batch line delivered again")
        assert 1 <= again <= 8
        print(
            f"fault test: {LINES} lines, {before} answered before the kill, {again} taken by the"
            f" killed server and delivered again, {len(output)} answered, {len(errors)} errors"
        )
    finally:
        assert served.stop() == 0
