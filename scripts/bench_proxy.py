"""The proxy path, side by side in one run: a fake OpenAI-compatible upstream called directly,
and the same upstream behind Tiffin's openai_compatible integration (one worker). Prints the
latency Tiffin adds (p50/p95, whole responses and 20-chunk streams), requests/s at concurrency
32, a table and one JSON line (see "Performance targets" in DESIGN.md).

    .venv/bin/python scripts/bench_proxy.py [--requests 300] [--throughput 3000]

The upstream answers at once from memory (a bare ASGI app under uvicorn, in its own process),
so what is measured is the proxy, not a model.

Telemetry's cost is measured here too, where it shows most (a request takes milliseconds, not
seconds): three more Tiffins behind the same upstream, with telemetry off, metrics only, and
metrics plus tracing of every request (exported over OTLP/HTTP to scripts/otlp_sink.py), take
turns in rounds of the concurrency-32 throughput run.
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
# Throughput lost to telemetry, as a fraction (DESIGN.md: under 3%).
COST_TARGETS = {
    "metrics_cost": 0.03,
    "metrics_tracing_cost": 0.03,
    "metrics_tracing_10pct_cost": 0.03,
}


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


TELEMETRY = {
    "off": ["telemetry.metrics=false", "telemetry.tracing=false"],
    "metrics": ["telemetry.metrics=true", "telemetry.tracing=false"],
    "metrics_tracing": ["telemetry.metrics=true", "+integrations=opentelemetry"],
    # The same, tracing one request in ten (ParentBased(TraceIdRatioBased(0.1))).
    "metrics_tracing_10pct": ["telemetry.metrics=true", "+integrations=opentelemetry"],
}


def tiffin_command(upstream_url: str, port: int, run_dir: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "runtime",
        "env=test",
        "integrations=[openai_compatible]",
        f"integrations.openai_compatible.settings.base_url={upstream_url}/v1",
        "integrations.openai_compatible.settings.model_prefix=up/",
        f"server.http_port={port}",
        f"server.run_dir={run_dir}",
        "server.workers=1",
        *extra,
    ]


def telemetry_cost(upstream_url: str, total: int, rounds: int) -> dict[str, float]:
    """Requests/s at concurrency 32 for each telemetry setting, alternating in rounds (so the
    machine's drift hits all alike); the median round of each."""
    sink_port = free_port()
    collector = f"http://127.0.0.1:{sink_port}"
    otel = "integrations.opentelemetry.settings"
    tracing = [f"{otel}.exporters=[otlp_http]", f"{otel}.endpoint={collector}"]
    ratios = {"metrics_tracing": 1.0, "metrics_tracing_10pct": 0.1}
    script = str(Path(__file__).resolve().parent / "otlp_sink.py")
    sink = start([sys.executable, script, str(sink_port)], f"{collector}/stats")
    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        urls = {}
        for name, extra in TELEMETRY.items():
            port = free_port()
            if name in ratios:
                extra = [*extra, *tracing, f"{otel}.sampling_ratio={ratios[name]}"]
            run_dir = tempfile.mkdtemp(prefix=f"bench-proxy-{name}-")
            servers[name] = start(
                tiffin_command(upstream_url, port, run_dir, extra),
                f"http://127.0.0.1:{port}/readyz",
            )
            urls[name] = f"http://127.0.0.1:{port}"
        rates: dict[str, list[float]] = {name: [] for name in urls}
        for url in urls.values():  # warm-up
            asyncio.run(throughput(url, "up/echo", 300))
        for _ in range(rounds):
            for name, url in urls.items():
                rates[name].append(asyncio.run(throughput(url, "up/echo", total)))
        if not httpx.get(f"{collector}/stats").json()["exports"]:
            raise SystemExit("tracing on, but no span reached the collector")
    finally:
        for server in servers.values():
            stop(server)
        stop(sink)
    return {f"{name}_rps": statistics.median(values) for name, values in rates.items()}


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--throughput", type=int, default=3000)
    parser.add_argument(
        "--telemetry-rounds", type=int, default=5, help="rounds of telemetry off/on (0: skip)"
    )
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
            tiffin_command(upstream_url, tiffin_port, run_dir, []),
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
        stop(tiffin)
        tiffin = None
        if args.telemetry_rounds:
            results["telemetry"] = telemetry_cost(
                upstream_url, args.throughput // 2, args.telemetry_rounds
            )
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
    telemetry = results.get("telemetry")
    if telemetry:
        off = telemetry["off_rps"]
        for name in TELEMETRY:
            rate = telemetry[f"{name}_rps"]
            print(f"telemetry {name:<16} {rate:>6.0f} requests/s ({1 - rate / off:+.1%} cost)")
        figures["metrics_cost"] = 1 - telemetry["metrics_rps"] / off
        figures["metrics_tracing_cost"] = 1 - telemetry["metrics_tracing_rps"] / off
        figures["metrics_tracing_10pct_cost"] = 1 - telemetry["metrics_tracing_10pct_rps"] / off
    for key, target in TARGETS.items():
        value = figures[key]
        higher = key == "requests_per_s"
        ok = value >= target if higher else value <= target
        bound = ">=" if higher else "<="
        print(f"{'ok  ' if ok else 'MISS'} {key}: {value:.2f} (target {bound} {target})")
    for key, limit in COST_TARGETS.items():
        if key in figures:
            ok = figures[key] < limit
            print(f"{'ok  ' if ok else 'MISS'} {key}: {figures[key]:.3f} (target < {limit})")
    print(json.dumps({"settings": vars(args), "results": results, "figures": figures}))


if __name__ == "__main__":
    main()
