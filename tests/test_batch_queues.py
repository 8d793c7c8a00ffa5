"""The queue integration on real brokers: one contract (put, take, ack, depth) on the in-process
queue, Redis Streams (Debian's redis-server) and RabbitMQ (Debian's rabbitmq-server); a line a
consumer took and never acked goes to another consumer; and a whole batch through each durable
queue, and through S3 (moto in server mode) for its files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from runtime.integrations.queue import LineQueue, MemoryQueue
from runtime.integrations.queue.amqp_queue import AmqpQueue
from runtime.integrations.queue.redis_queue import RedisStreamQueue
from tests.conftest import free_port
from tests.real_rabbitmq import RabbitServer, running_rabbitmq
from tests.real_redis import RedisServer, running_redis
from tests.real_s3 import running_s3
from tests.test_batches import Served, Servers, chat_line, finished, jsonl, lines_of

Compose = Callable[..., DictConfig]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitServer]:
    with running_rabbitmq() as server:
        yield server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with running_s3() as endpoint:
        yield endpoint


QueueFactory = Callable[[str], LineQueue]


@pytest.fixture(params=["memory", "redis", "rabbitmq"])
async def make_queue(
    request: pytest.FixtureRequest, redis_server: RedisServer, rabbit: RabbitServer
) -> AsyncIterator[QueueFactory]:
    made: list[LineQueue] = []
    shared = MemoryQueue()

    def make(name: str) -> LineQueue:
        queue: LineQueue
        if request.param == "memory":
            queue = shared
        elif request.param == "redis":
            queue = RedisStreamQueue(redis_server.url, name, "g", redeliver_after_s=0.3)
        else:
            queue = AmqpQueue(rabbit.url, name, prefetch=4)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()


async def test_queue_contract(make_queue: QueueFactory, request: pytest.FixtureRequest) -> None:
    name = f"contract-{request.node.callspec.id}"
    queue = make_queue(name)
    assert await queue.check()
    await queue.put([{"n": i} for i in range(3)])
    assert await queue.take(block_s=0.05) is not None  # taken, not acked
    taken = []
    for _ in range(2):
        delivery = await queue.take(block_s=5)
        assert delivery is not None
        taken.append(delivery.message["n"])
        await queue.ack(delivery)
    assert await queue.take(block_s=0.2) is None or not queue.durable
    assert await queue.depth() == 0


async def test_a_line_never_acked_goes_to_another_consumer(
    make_queue: QueueFactory, request: pytest.FixtureRequest
) -> None:
    name = f"redeliver-{request.node.callspec.id}"
    first = make_queue(name)
    if not first.durable:
        pytest.skip("the in-process queue dies with its process (the supervisor re-queues)")
    await first.put([{"line": 7}])
    taken = await first.take(block_s=5)
    assert taken is not None and not taken.redelivered
    await first.close()  # the consumer dies with the line unacked
    second = make_queue(name)
    again = None
    for _ in range(50):
        again = await second.take(block_s=0.5)
        if again is not None:
            break
    assert again is not None and again.message == {"line": 7} and again.redelivered
    await second.ack(again)
    assert await second.take(block_s=0.5) is None


async def batch_through(served: Served, count: int = 5) -> None:
    client = served.client()
    lines = [chat_line(f"q{i}", f"Name {i} fruit.") for i in range(count)]
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "completed", done
    output = await lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == [f"q{i}" for i in range(count)]


@pytest.fixture
async def serve(compose_test: Compose, tmp_path: Path) -> AsyncIterator[Servers]:
    servers = Servers(compose_test, tmp_path)
    yield servers
    await servers.stop()


@pytest.mark.slow
async def test_a_batch_on_redis_streams(
    serve: Callable[..., Any], redis_server: RedisServer
) -> None:
    served = await serve(
        "integrations=[queue,redis,custom_models]",
        f"integrations.redis.settings.url={redis_server.url}",
        "integrations.queue.settings.name=batch-redis",
    )
    assert served.runtime.integrations.get_integration("queue").backend == "redis"
    await batch_through(served)


@pytest.mark.slow
async def test_a_batch_on_rabbitmq_with_files_in_s3(
    serve: Callable[..., Any], rabbit: RabbitServer, s3_server: str
) -> None:
    s3 = "integrations.object_storage.settings"
    served = await serve(
        "integrations=[queue,custom_models]",
        f"integrations.queue.settings.amqp_url={rabbit.url}",
        f"{s3}.backend=s3",
        f"{s3}.endpoint_url={s3_server}",
        f"{s3}.bucket=batches",
        f"{s3}.region=us-east-1",
        f"{s3}.access_key_id=moto-key",
        f"{s3}.secret_access_key=moto-secret",
        f"{s3}.create_bucket=true",
    )
    queue = served.runtime.integrations.get_integration("queue")
    assert queue.backend == "rabbitmq"
    status = json.dumps(queue.describe())
    assert "guest:guest" not in status  # the AMQP password is never shown
    await batch_through(served)


async def test_queue_health_says_when_the_broker_is_gone(serve: Callable[..., Any]) -> None:
    port = free_port()  # nothing listens there
    served = await serve(
        "integrations=[queue,custom_models]",
        f"integrations.queue.settings.amqp_url=amqp://user:s3cret-pw@127.0.0.1:{port}/",
        "integrations.queue.settings.timeout_s=1",
        "integrations.queue.retry_config.max_retries=0",
    )
    queue = served.runtime.integrations.get_integration("queue")
    assert queue.status.value == "error"
    async with served.http() as http:
        status = (await http.get("/integrations/queue/status")).text
        assert "s3cret-pw" not in status
        answer = await http.post(
            "/v1/batches",
            json={
                "input_file_id": "file-x",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "queue_unavailable"
    await asyncio.sleep(0)
