"""Adversarial fuzzing of a served Tiffin, bounded and on loopback only.

Starts `python -m runtime` as production runs it (env=prod: auth on, JSON logs; one worker,
gRPC on; answers capped at 64 tokens by limits.default_max_tokens), with the packaged models,
then sends every named case of scripts/fuzz_inputs.py (the inputs that crashed a worker, held
a model hostage or answered 500 in issue 14's run) on each transport that can carry it, then
`--count` seeded random mutations of valid bodies.
Each input is one request with a time limit; after each, the server must still be alive.

  5xx     an HTTP 5xx, a GraphQL error with a 5xx status, a WebSocket error frame of a server
          error, a gRPC INTERNAL/UNKNOWN
  hang    no answer within --timeout seconds
  crash   a process of the server's tree died: the server exited (it is restarted), or a
          worker did (BentoML starts a new one; the run waits until it is ready)

    .venv/bin/python scripts/fuzz.py                  # named cases + 300 random, ~2 min
    .venv/bin/python scripts/fuzz.py --count 40 --json

Prints a table and one JSON line (the line alone with --json); exits 1 on any 5xx, hang or crash.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from scripts.bench_inference import free_port, stop_group, wait_ready
from scripts.fuzz_inputs import Case, named_cases, random_cases

ROOT = Path(__file__).resolve().parent.parent
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def grpc_chat(model: str, text: str) -> bytes:
    request = pb.ChatRequest(model=model, messages=[pb.ChatMessage(role="user", content=text)])
    request.max_tokens = 4
    return bytes(request.SerializeToString())


@dataclass
class Server:
    """The served process, restarted after a crash."""

    work: Path
    key: str
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "runtime",
            "env=prod",
            "server.host=127.0.0.1",
            f"server.http_port={self.http_port}",
            f"server.grpc_port={self.grpc_port}",
            f"server.run_dir={self.work / 'runs'}",
            "server.workers=1",
            "telemetry.tracing=false",
            "telemetry.exporters=[prometheus]",
            # A body that lost its max_tokens is a valid request for up to 2048 tokens (minutes
            # of the base model rambling on a shared CPU), not a hang: keep valid answers short.
            "limits.default_max_tokens=64",
            f"integrations.custom_models.settings.cache_dir={self.work / 'models'}",
        ]

    def start(self) -> None:
        self.starts += 1
        log = self.work / f"server-{self.starts}.log"
        env = {**os.environ, "TIFFIN_API_KEY": self.key, "BENTOML_DO_NOT_TRACK": "true"}
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.wait_ready()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tree(self) -> set[int]:
        """The pids of the server and its workers."""
        if not self.alive():
            return set()
        assert self.process is not None
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            return {root.pid, *(p.pid for p in root.children(recursive=True))}
        return set()

    def wait_ready(self) -> None:
        assert self.process is not None
        wait_ready(self.process, f"{self.http}/readyz", self.work / f"server-{self.starts}.log")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)


@dataclass
class Result:
    case: Case
    verdict: str  # ok | 4xx | 5xx | hang | crash
    detail: str = ""


async def send_http(client: httpx.AsyncClient, case: Case) -> tuple[str, str]:
    response = await client.post(case.target, content=case.payload)
    detail = f"{response.status_code} {response.text[:160]}"
    if response.status_code >= 500:
        return "5xx", detail
    if case.target == "/graphql" and response.status_code == 200:
        for error in response.json().get("errors") or []:
            if int((error.get("extensions") or {}).get("status") or 400) >= 500:
                return "5xx", detail
    return ("ok" if response.status_code < 400 else "4xx"), detail


async def send_ws(server: Server, case: Case, limit_s: float) -> tuple[str, str]:
    url = server.http.replace("http://", "ws://") + case.target
    headers = {"authorization": f"Bearer {server.key}"}
    async with connect(url, additional_headers=headers, open_timeout=limit_s) as ws:
        await ws.send(case.payload.decode("utf-8", "surrogatepass"))
        while True:
            try:
                frame = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                return ("5xx" if code == 1011 else "4xx"), f"closed {code}"
            if frame.get("type") == "done":
                return "ok", "done"
            if frame.get("type") == "error":
                error = frame.get("error") or {}
                verdict = "5xx" if error.get("type") == "server_error" else "4xx"
                return verdict, f"{error.get('type')}/{error.get('code')}"


async def send_grpc(server: Server, case: Case, limit_s: float) -> tuple[str, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_stream(case.target, lambda raw: raw, lambda raw: raw)
        metadata = (("authorization", f"Bearer {server.key}"),)
        try:
            async for _ in call(case.payload, metadata=metadata, timeout=limit_s):
                pass
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return "hang", "deadline exceeded"
            verdict = "5xx" if code in SERVER_ERRORS else "4xx"
            return verdict, f"{code.name}: {(exc.details() or '')[:160]}"
        return "ok", "OK"


async def run_case(server: Server, client: httpx.AsyncClient, case: Case, limit_s: float) -> Result:
    before = server.tree()
    try:
        async with asyncio.timeout(limit_s + 5):
            if case.transport == "http":
                verdict, detail = await send_http(client, case)
            elif case.transport == "ws":
                verdict, detail = await send_ws(server, case, limit_s)
            else:
                verdict, detail = await send_grpc(server, case, limit_s)
    except (TimeoutError, httpx.TimeoutException):
        verdict, detail = "hang", f"no answer in {limit_s:.0f} s"
    except (httpx.TransportError, WebSocketException, OSError) as exc:
        verdict, detail = "broken", f"{type(exc).__name__}: {exc}"[:200]
    if not server.alive():
        return Result(case, "crash", f"server exited {server.process and server.process.poll()}")
    if gone := before - server.tree():
        return Result(case, "crash", f"process {sorted(gone)} died ({detail})")
    if verdict == "broken":  # a dropped connection from a live server is a failure too
        verdict = "5xx"
    return Result(case, verdict, detail)


async def fuzz(server: Server, cases: list[Case], limit_s: float) -> list[Result]:
    results = []
    headers = {"authorization": f"Bearer {server.key}"}
    for case in cases:
        async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=limit_s) as c:
            result = await run_case(server, c, case, limit_s)
        results.append(result)
        if result.verdict == "crash" and not server.alive():
            server.stop()
            server.start()
        elif result.verdict == "crash":
            await asyncio.to_thread(server.wait_ready)
    return results


def report(results: list[Result], seconds: float, server: Server, load: float) -> dict[str, Any]:
    by_transport: dict[str, Counter[str]] = {}
    for result in results:
        by_transport.setdefault(result.case.transport, Counter())[result.verdict] += 1
    failures = [r for r in results if r.verdict in ("5xx", "hang", "crash")]
    totals = Counter(r.verdict for r in results)
    return {
        "inputs": len(results),
        "ok": totals["ok"],
        "4xx": totals["4xx"],
        "5xx": totals["5xx"],
        "hangs": totals["hang"],
        "crashes": totals["crash"],
        "server_starts": server.starts,
        "seconds": round(seconds, 1),
        "load_avg_1m": round(load, 2),
        "by_transport": {t: dict(c) for t, c in sorted(by_transport.items())},
        "failures": [
            {
                "case": r.case.name,
                "transport": r.case.transport,
                "target": r.case.target,
                "verdict": r.verdict,
                "detail": r.detail[:200],
            }
            for r in failures[:30]
        ],
        "passed": not failures,
    }


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'transport':<10} {'inputs':>7} {'ok':>6} {'4xx':>6} {'5xx':>5} {'hang':>5} {'crash':>6}"
    ]
    for transport, counts in summary["by_transport"].items():
        total = sum(counts.values())
        cells = [counts.get(k, 0) for k in ("ok", "4xx", "5xx", "hang", "crash")]
        lines.append(f"{transport:<10} {total:>7} " + " ".join(f"{c:>5}" for c in cells))
    lines.append(
        f"{summary['inputs']} inputs in {summary['seconds']} s (load {summary['load_avg_1m']}): "
        f"{summary['5xx']} x 5xx, {summary['hangs']} hangs, {summary['crashes']} crashes"
    )
    lines += [f"  FAIL {f['verdict']} {f['transport']} {f['target']} {f['case']}: {f['detail']}"
              for f in summary["failures"]]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="random inputs after the named ones")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a hang")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--keep-log", type=Path, help="copy the server's logs here")
    args = parser.parse_args()
    cases = [*named_cases(grpc_chat), *random_cases(args.count, args.seed)]
    with tempfile.TemporaryDirectory(prefix="tiffin-fuzz-") as temp:
        server = Server(Path(temp), secrets.token_urlsafe(24))
        started = time.monotonic()
        try:
            server.start()
            results = asyncio.run(fuzz(server, cases, args.timeout))
        finally:
            server.stop()
            if args.keep_log is not None:
                logs = sorted(Path(temp).glob("server-*.log"))
                args.keep_log.write_text("".join(p.read_text(errors="replace") for p in logs))
        summary = report(results, time.monotonic() - started, server, os.getloadavg()[0])
    if not args.json:
        print(table(summary))
    print(json.dumps(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
