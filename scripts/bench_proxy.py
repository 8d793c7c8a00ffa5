"""The proxy path, side by side in one run: a fake OpenAI-compatible upstream called directly,
and the same upstream behind Tiffin's openai_compatible integration (one worker). Prints the
latency Tiffin adds (p50/p95, whole responses and 20-chunk streams), requests/s at concurrency
32, a table and one JSON line (see "Performance targets" in DESIGN.md).

    .venv/bin/python scripts/bench_proxy.py [--requests 300] [--throughput 3000]

The upstream answers at once from memory (a bare ASGI app under uvicorn, in its own process),
so what is measured is the proxy, not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 20
TARGETS = {"whole_added_p50_ms": 2.5, "stream_added_p50_ms": 7.0, "requests_per_s": 400.0}


# --- the fake upstream (run with --serve-upstream PORT) ----------------------------------------


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


STREAM = b"".join(
    [
        *(
            _event(
                {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
            )
            for i in range(CHUNKS)
        ),
        _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        _event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": CHUNKS}}),
        b"data: [DONE]\n\n",
    ]
)
WHOLE = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "echo", "object": "model"}]}).encode()


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models"):
        payload, media = MODELS, b"application/json"
    elif b'"stream": true' in body or b'"stream":true' in body:
        payload, media = STREAM, b"text/event-stream"
    else:
        payload, media = WHOLE, b"application/json"
    headers = [(b"content-type", media), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# --- measuring -----------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(args: list[str], ready: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(ready, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    stop(process)
    raise SystemExit(f"{args[2:4]} did not become ready at {ready}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


async def latencies(base: str, model: str, stream: bool, n: int) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    times = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for i in range(n + 20):  # 20 warm-ups
            started = time.perf_counter()
            if stream:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass
            else:
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()
            if i >= 20:
                times.append((time.perf_counter() - started) * 1000)
    return times


async def throughput(base: str, model: str, total: int, concurrency: int = 32) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        remaining = iter(range(total))

        async def worker() -> None:
            for _ in remaining:
                (await client.post("/v1/chat/completions", json=body)).raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - started)


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--throughput", type=int, default=3000)
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        import uvicorn

        uvicorn.run(upstream_app, host="127.0.0.1", port=args.serve_upstream, log_level="error")
        return

    up_port, tiffin_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    script = str(Path(__file__).resolve())
    upstream = start(
        [sys.executable, script, "--serve-upstream", str(up_port)], upstream_url + "/v1/models"
    )
    tiffin = None
    try:
        run_dir = tempfile.mkdtemp(prefix="bench-proxy-")
        tiffin = start(
            [
                sys.executable,
                "-m",
                "runtime",
                "env=test",
                "integrations=[openai_compatible]",
                f"integrations.openai_compatible.settings.base_url={upstream_url}/v1",
                "integrations.openai_compatible.settings.model_prefix=up/",
                f"server.http_port={tiffin_port}",
                f"server.run_dir={run_dir}",
                "server.workers=1",
            ],
            f"http://127.0.0.1:{tiffin_port}/readyz",
        )
        tiffin_url = f"http://127.0.0.1:{tiffin_port}"
        results: dict[str, Any] = {}
        runs: dict[str, Callable[[], Awaitable[list[float]]]] = {
            "direct_whole": lambda: latencies(upstream_url, "echo", False, args.requests),
            "tiffin_whole": lambda: latencies(tiffin_url, "up/echo", False, args.requests),
            "direct_stream": lambda: latencies(upstream_url, "echo", True, args.requests),
            "tiffin_stream": lambda: latencies(tiffin_url, "up/echo", True, args.requests),
        }
        for name, run in runs.items():
            times = asyncio.run(run())
            results[name] = {"p50_ms": p(times, 50), "p95_ms": p(times, 95)}
        for kind in ("direct", "tiffin"):
            base, model = (upstream_url, "echo") if kind == "direct" else (tiffin_url, "up/echo")
            rate = asyncio.run(throughput(base, model, args.throughput))
            results[f"{kind}_rps"] = rate
    finally:
        if tiffin is not None:
            stop(tiffin)
        stop(upstream)

    figures = {
        "whole_added_p50_ms": results["tiffin_whole"]["p50_ms"] - results["direct_whole"]["p50_ms"],
        "whole_added_p95_ms": results["tiffin_whole"]["p95_ms"] - results["direct_whole"]["p95_ms"],
        "stream_added_p50_ms": results["tiffin_stream"]["p50_ms"]
        - results["direct_stream"]["p50_ms"],
        "stream_added_p95_ms": results["tiffin_stream"]["p95_ms"]
        - results["direct_stream"]["p95_ms"],
        "requests_per_s": results["tiffin_rps"],
    }
    print(f"{'path':<16}{'p50 ms':>10}{'p95 ms':>10}")
    for name in runs:
        print(f"{name:<16}{results[name]['p50_ms']:>10.2f}{results[name]['p95_ms']:>10.2f}")
    print(f"requests/s at concurrency 32: direct {results['direct_rps']:.0f}, "
          f"tiffin {results['tiffin_rps']:.0f}")  # fmt: skip
    for key, target in TARGETS.items():
        value = figures[key]
        higher = key == "requests_per_s"
        ok = value >= target if higher else value <= target
        bound = ">=" if higher else "<="
        print(f"{'ok  ' if ok else 'MISS'} {key}: {value:.2f} (target {bound} {target})")
    print(json.dumps({"settings": vars(args), "results": results, "figures": figures}))


if __name__ == "__main__":
    main()
