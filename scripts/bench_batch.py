"""The Batch API against live requests, on one served `python -m runtime` (env=test, the packaged
Gemma 3 270M on llama.cpp, `integrations=[custom_models,queue]`: the in-process queue and local
object storage).

    .venv/bin/python scripts/bench_batch.py [--lines 500] [--max-tokens 16] [--rounds 2]

1. Throughput: the same `--lines` short chat lines sent as live requests at concurrency 8, and
   through the Batch API (upload, create, poll until completed), alternating `--rounds` times.
   The ratio is live time / batch time (target >= 0.9: the queue costs little).
2. Live latency while a batch runs: one interactive client (a request, a pause of `--think` s,
   again) for a window without a batch and for a window while a batch runs, alternating. The
   ratio is the p95 with the batch over the p95 without (target <= 1.2).

Prints a table, the machine's load, and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_inference import free_port, serving

MODEL = "gemma-3-270m"
PARALLEL = 8


def body(i: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write one line about the number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": i,
    }


async def live_run(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> float:
    """Seconds to answer every body as a live request, 8 at a time."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            answer = await client.post("/v1/chat/completions", json=queue.get_nowait())
            answer.raise_for_status()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(PARALLEL)))
    return time.monotonic() - started


async def submit(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> str:
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for i, b in enumerate(bodies)
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    upload = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
    )
    upload.raise_for_status()
    batch = await client.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    batch.raise_for_status()
    return str(batch.json()["id"])


async def wait_batch(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    while True:
        batch: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        await asyncio.sleep(0.2)


async def batch_run(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> float:
    started = time.monotonic()
    batch = await wait_batch(client, await submit(client, bodies))
    counts = batch["request_counts"]
    if batch["status"] != "completed" or counts["completed"] != len(bodies):
        raise SystemExit(f"batch did not complete every line: {batch}")
    return time.monotonic() - started


async def interactive(
    client: httpx.AsyncClient, until: float, think: float, max_tokens: int
) -> list[float]:
    """One user: a request, a pause, again, until `until`; each request's latency."""
    latencies = []
    i = 0
    while time.monotonic() < until:
        started = time.monotonic()
        answer = await client.post("/v1/chat/completions", json=body(10_000 + i, max_tokens))
        answer.raise_for_status()
        latencies.append(time.monotonic() - started)
        i += 1
        await asyncio.sleep(think)
    return latencies


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    bodies = [body(i, args.max_tokens) for i in range(args.lines)]
    loads = [os.getloadavg()[0]]
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await live_run(client, bodies[:16])  # warm: slots, prompt cache, code paths
        live_s: list[float] = []
        batch_s: list[float] = []
        for _ in range(args.rounds):
            live_s.append(await live_run(client, bodies))
            loads.append(os.getloadavg()[0])
            batch_s.append(await batch_run(client, bodies))
            loads.append(os.getloadavg()[0])
            print(f"  throughput: live {live_s[-1]:.1f}s, batch {batch_s[-1]:.1f}s")
        quiet: list[float] = []
        busy: list[float] = []
        for _ in range(args.rounds):
            quiet += await interactive(
                client, time.monotonic() + args.window, args.think, args.max_tokens
            )
            batch_id = await submit(client, bodies)
            await asyncio.sleep(2)  # the batch's lines are running
            busy += await interactive(
                client, time.monotonic() + args.window, args.think, args.max_tokens
            )
            await client.post(f"/v1/batches/{batch_id}/cancel")
            await wait_batch(client, batch_id)
            loads.append(os.getloadavg()[0])
            print(f"  latency: {len(quiet)} without, {len(busy)} during a batch")
    return {
        "lines": args.lines,
        "max_tokens": args.max_tokens,
        "live_s": live_s,
        "batch_s": batch_s,
        "throughput_ratio": statistics.median(live_s) / statistics.median(batch_s),
        "live_requests_without": len(quiet),
        "live_requests_during": len(busy),
        "p95_without_s": p95(quiet),
        "p95_during_s": p95(busy),
        "p95_ratio": p95(busy) / p95(quiet),
        "p50_ratio": statistics.median(busy) / statistics.median(quiet),
        "load_avg_1m": loads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=30.0, help="seconds per latency window")
    parser.add_argument("--think", type=float, default=0.5, help="pause between live requests")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "runtime",
        "env=test",
        "integrations=[custom_models,queue]",
        f"server.http_port={port}",
        f"server.run_dir={work / 'runs'}",
        f"integrations.custom_models.settings.cache_dir={work / 'models'}",
        f"integrations.custom_models.settings.models_dir={work / 'none'}",
        f"integrations.custom_models.settings.models.0.engine_settings.parallel={PARALLEL}",
        "integrations.custom_models.settings.models.0.max_queue=64",
        f"integrations.object_storage.settings.root={work / 'objects'}",
        "batch.poll_s=0.2",
    ]  # fmt: skip
    os.environ.update({"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    with serving(command, url + "/readyz", work / "serve.log"):
        result = asyncio.run(measure(url, args))
    print()
    print("| measure | live | batch API | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    live, batch = statistics.median(result["live_s"]), statistics.median(result["batch_s"])
    print(
        f"| {args.lines} lines, {args.max_tokens} tokens each (s, median) | {live:.1f} |"
        f" {batch:.1f} | {result['throughput_ratio']:.2f} | >= 0.9 |"
    )
    print(
        f"| interactive p95 latency (s): without / during a batch | {result['p95_without_s']:.2f}"
        f" | {result['p95_during_s']:.2f} | {result['p95_ratio']:.2f} | <= 1.2 |"
    )
    loads = result["load_avg_1m"]
    print(f"\nload average (1 min): {min(loads):.1f}-{max(loads):.1f}")
    print(json.dumps({"bench": "batch", **result}))


if __name__ == "__main__":
    main()
