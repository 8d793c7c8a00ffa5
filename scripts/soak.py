"""Soak test: N concurrent streaming chat clients for M minutes against a served Tiffin
(`python -m runtime`, the packaged Gemma 3 270M GGUF on llama.cpp, with the database
integration so the request log is checked), across transports: OpenAI HTTP streaming (SSE),
gRPC streaming, WebSocket /ws/chat, and GraphQL's generateText mutation (a whole answer; the
schema has no generation subscription). A fraction of requests close the connection on purpose
after a few tokens. Clients back off 0.1-0.3 s after a refusal (not the whole Retry-After, to
keep the pressure on).

Targets (exit 1 when one is missed):
  zero 5xx           nothing but 200, a deliberate disconnect, or a 429/503 refusal in the
                     protocol's own shape; any other status or an error mid-stream is a failure
  zero unanswered    no client timeout and no broken connection without an answer
  zero lost rows     every request the server answered has its row in the SQLite request log,
                     read after the server has shut down (and flushed). The log records every
                     request whose handler resolved a model (runtime/telemetry/live_stats.py), so
                     disconnected (499) and queue-refused (429) ones too; the clients send only
                     such requests, so each answered one must have a row
  RSS growth < 10%   of the server's process tree, from the end of warm-up (the first 20% of
                     the run) to the end; --short reports it but does not enforce it (15 s is
                     too short and too noisy to tell growth from a late allocation)
  clean exit         the server exits 0 on SIGTERM

    .venv/bin/python scripts/soak.py --clients 8 --minutes 5
    .venv/bin/python scripts/soak.py --short --json     # CI: 15 s of load, ~35 s in all

Prints a table and one JSON line (the line alone with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_inference import free_port, stop_group, wait_ready
from scripts.soak_clients import TRANSPORTS, Client, Outcome, Target

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "gemma-3-270m"
MODELS = "integrations.custom_models.settings.models"
RSS_GROWTH_LIMIT = 0.10
WARMUP_FRACTION = 0.2


@dataclass(frozen=True)
class Settings:
    clients: int
    seconds: float
    disconnect_fraction: float
    transports: tuple[str, ...]
    max_tokens: int
    max_queue: int | None
    timeout_s: float
    sample_s: float
    seed: int
    enforce_rss: bool
    threads: int | None = None
    keep_log: Path | None = None


# --- the served process ----------------------------------------------------------------------


def command(settings: Settings, work: Path, http_port: int, grpc_port: int) -> list[str]:
    overrides = [
        "env=test",
        "integrations=[custom_models,database]",
        f"integrations.database.settings.data_dir={work / 'data'}",
        f"server.http_port={http_port}",
        "transports.grpc=true",
        f"server.grpc_port={grpc_port}",
        f"server.run_dir={work / 'runs'}",
        "server.workers=1",
        # Chat only: the embeddings model is not asked for, so it is not loaded.
        f"{MODELS}.1.preload=false",
    ]
    if settings.max_queue is not None:
        overrides.append(f"{MODELS}.0.max_queue={settings.max_queue}")
    if settings.threads is not None:
        overrides.append(f"++{MODELS}.0.engine_settings.n_threads={settings.threads}")
    return [sys.executable, "-m", "runtime", *overrides]


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total


async def sample_rss(root: psutil.Process, every: float, samples: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while True:
        samples.append((time.monotonic() - started, tree_rss(root)))
        await asyncio.sleep(every)


# --- the load --------------------------------------------------------------------------------


async def client_loop(
    client: Client, settings: Settings, until: float, rng: random.Random, out: list[Outcome]
) -> None:
    try:
        while time.monotonic() < until:
            disconnect = None
            if client.transport != "graphql" and rng.random() < settings.disconnect_fraction:
                disconnect = rng.randint(1, max(1, settings.max_tokens // 2))
            outcome = await client.request(disconnect)
            out.append(outcome)
            if outcome.kind == "disconnected":
                await client.reset()
            elif outcome.kind == "refused":
                await asyncio.sleep(rng.uniform(0.1, 0.3))
    finally:
        await client.close()


async def load(
    settings: Settings, target: Target, root: psutil.Process
) -> tuple[list[Outcome], list[tuple[float, int]]]:
    outcomes: list[Outcome] = []
    samples: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_rss(root, settings.sample_s, samples))
    until = time.monotonic() + settings.seconds
    rng = random.Random(settings.seed)  # noqa: S311 - reproducible choices, not secrets
    clients = [
        Client(target, settings.transports[i % len(settings.transports)], i)
        for i in range(settings.clients)
    ]
    seeds = [rng.getrandbits(32) for _ in clients]
    try:
        await asyncio.gather(
            *(
                client_loop(c, settings, until, random.Random(s), outcomes)  # noqa: S311
                for c, s in zip(clients, seeds, strict=True)
            )
        )
    finally:
        sampler.cancel()
    samples.append((samples[-1][0] + settings.sample_s if samples else 0.0, tree_rss(root)))
    return outcomes, samples


# --- checking and reporting ------------------------------------------------------------------


def logged_rows(database: Path) -> dict[str, tuple[str, int]]:
    """request_id -> (transport, status) of every request-log row."""
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT request_id, transport, status FROM request_log").fetchall()
    return {str(r[0]): (str(r[1]), int(r[2])) for r in rows}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    served = [o for o in outcomes if o.kind == "served"]
    latency = [o.latency_s * 1e3 for o in served if o.latency_s is not None]
    ttft = [o.ttft_s * 1e3 for o in outcomes if o.ttft_s is not None and o.transport != "graphql"]
    return {
        "requests": len(outcomes),
        **{kind: sum(1 for o in outcomes if o.kind == kind) for kind in KINDS},
        "latency_p50_ms": percentile(latency, 50),
        "latency_p99_ms": percentile(latency, 99),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tokens": sum(o.tokens for o in outcomes),
    }


KINDS = ("served", "disconnected", "refused", "failed", "unanswered")


def rss_report(samples: list[tuple[float, int]], seconds: float) -> dict[str, Any]:
    """Growth from the end of warm-up (median of the first 3 samples after it) to the end
    (median of the last 3), and a dozen points of the series."""
    after = [rss for at, rss in samples if at >= WARMUP_FRACTION * seconds] or [samples[-1][1]]
    baseline = statistics.median(after[:3])
    final = statistics.median(after[-3:])
    step = max(1, len(samples) // 12)
    return {
        "start_mb": samples[0][1] / 1e6,
        "warm_mb": baseline / 1e6,
        "end_mb": final / 1e6,
        "peak_mb": max(rss for _, rss in samples) / 1e6,
        "growth": final / baseline - 1,
        "series_mb": [[round(at, 1), round(rss / 1e6, 1)] for at, rss in samples[::step]],
    }


def check_log(outcomes: list[Outcome], rows: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Every request the server answered must have its row; none may have two ids wrong."""
    answered = [o for o in outcomes if o.kind != "unanswered"]
    lost = [o.request_id for o in answered if o.request_id not in rows]
    ours = {o.request_id for o in outcomes}
    wrong_transport = [
        o.request_id
        for o in answered
        if o.request_id in rows and rows[o.request_id][0] != o.transport
    ]
    return {
        "rows": len(rows),
        "expected": len(answered),
        "lost_rows": len(lost),
        "lost_ids": lost[:10],
        "wrong_transport": len(wrong_transport),
        "unknown_rows": sum(1 for rid in rows if rid not in ours),
        "row_statuses": dict(Counter(str(status) for _, status in rows.values())),
        "disconnected_logged_as": dict(
            Counter(
                str(rows[o.request_id][1])
                for o in outcomes
                if o.kind == "disconnected" and o.request_id in rows
            )
        ),
    }


def verdicts(report: dict[str, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    total, log, rss = report["total"], report["request_log"], report["rss"]
    statuses = Counter({k: v for k, v in report["statuses"].items()})
    five_xx = sum(n for status, n in statuses.items() if status.startswith("5") and status != "503")
    found = {
        "served_some": (total["served"], total["served"] > 0, True),
        "zero_5xx": (five_xx, five_xx == 0, True),
        "zero_failed": (total["failed"], total["failed"] == 0, True),
        "zero_unanswered": (total["unanswered"], total["unanswered"] == 0, True),
        "zero_lost_rows": (log["lost_rows"], log["lost_rows"] == 0, True),
        "rss_growth_under_10pct": (
            rss["growth"],
            rss["growth"] < RSS_GROWTH_LIMIT,
            settings.enforce_rss,
        ),
        "clean_exit": (report["server_exit_code"], report["server_exit_code"] == 0, True),
    }
    return {
        name: {"value": value, "ok": ok, "enforced": enforced}
        for name, (value, ok, enforced) in found.items()
    }


def table(report: dict[str, Any]) -> str:
    columns = ["requests", *KINDS, "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms"]
    columns.append("ttft_p99_ms")
    lines = [f"{'transport':<10}" + "".join(f"{c:>15}" for c in columns)]
    for name, row in [*report["by_transport"].items(), ("all", report["total"])]:
        cells = "".join(f"{'-':>15}" if row[c] is None else f"{row[c]:>15.0f}" for c in columns)
        lines.append(f"{name:<10}" + cells)
    rss, log = report["rss"], report["request_log"]
    lines.append(f"statuses: {report['statuses']}  errors: {report['errors']}")
    lines.append(
        f"RSS (process tree): start {rss['start_mb']:.0f} MB, after warm-up"
        f" {rss['warm_mb']:.0f} MB, end {rss['end_mb']:.0f} MB, peak {rss['peak_mb']:.0f} MB,"
        f" growth {rss['growth']:+.1%}"
    )
    lines.append(
        f"request log: {log['rows']} rows for {log['expected']} answered requests, lost"
        f" {log['lost_rows']}, unknown {log['unknown_rows']}; statuses {log['row_statuses']}"
    )
    for name, verdict in report["verdicts"].items():
        mark = "ok  " if verdict["ok"] else ("MISS" if verdict["enforced"] else "note")
        lines.append(f"{mark} {name}: {verdict['value']}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tiffin-soak-") as temp:
        work = Path(temp)
        http_port, grpc_port = free_port(), free_port()
        base = f"http://127.0.0.1:{http_port}"
        log = work / "server.log"
        started = time.monotonic()
        with log.open("wb") as out:
            process = subprocess.Popen(
                command(settings, work, http_port, grpc_port),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
            )
            try:
                wait_ready(process, f"{base}/readyz", log)
                startup_s = time.monotonic() - started
                load_avg = os.getloadavg()
                target = Target(
                    base,
                    f"127.0.0.1:{grpc_port}",
                    MODEL_ID,
                    settings.max_tokens,
                    settings.timeout_s,
                )
                root = psutil.Process(process.pid)
                outcomes, samples = asyncio.run(load(settings, target, root))
                live = httpx.get(f"{base}/metrics/live", timeout=10).json()["requests"]
                process.terminate()  # SIGTERM: drain, flush the request log, exit
                exit_code = process.wait(timeout=90)
            finally:
                stop_group(process)
        rows = logged_rows(work / "data" / "tiffin.db")
        server_log = log.read_text(errors="replace")
        if settings.keep_log is not None:
            settings.keep_log.write_text(server_log)
    transports = sorted({o.transport for o in outcomes}, key=settings.transports.index)
    report: dict[str, Any] = {
        "settings": {
            **asdict(settings),
            "transports": list(settings.transports),
            "keep_log": str(settings.keep_log or ""),
        },
        "startup_s": startup_s,
        "load_avg_at_start": load_avg,
        "load_avg_at_end": os.getloadavg(),
        "total": summary(outcomes),
        "by_transport": {t: summary([o for o in outcomes if o.transport == t]) for t in transports},
        "statuses": dict(Counter(str(o.status or o.kind) for o in outcomes)),
        "errors": dict(
            Counter(
                f"{o.transport} {o.kind}: {o.detail}"
                for o in outcomes
                if o.kind in ("failed", "unanswered", "refused")
            )
        ),
        "server_live_requests": live,
        "rss": rss_report(samples, settings.seconds),
        "request_log": check_log(outcomes, rows),
        "server_exit_code": exit_code,
        "server_tracebacks": server_log.count("Traceback"),
    }
    report["verdicts"] = verdicts(report, settings)
    report["ok"] = all(v["ok"] for v in report["verdicts"].values() if v["enforced"])
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long the load runs (default 5)")
    length.add_argument("--seconds", type=float, help="the same, in seconds")
    parser.add_argument(
        "--disconnect-fraction",
        type=float,
        help="share of streamed requests closed on purpose after a few tokens "
        "(default 0.2; 0.5 with --short)",
    )
    parser.add_argument(
        "--transports",
        default=",".join(TRANSPORTS),
        help=f"comma-separated, clients take turns (default {','.join(TRANSPORTS)})",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="per request (default 16)")
    parser.add_argument(
        "--max-queue",
        type=int,
        help="the model's max_queue (default: the packaged 16); below --clients, some get 429",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="llama.cpp's n_threads (default: unset, so each step runs on the cores the rest of"
        " the machine leaves free)",
    )
    parser.add_argument("--timeout", type=float, default=120, help="client timeout per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--short",
        action="store_true",
        help="CI mode: 4 clients, 15 s, max_tokens 8, max_queue 2 (so some are refused); "
        "RSS growth reported, not enforced",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--server-log", type=Path, help="keep the server's log in this file")
    args = parser.parse_args()
    transports = tuple(t.strip() for t in args.transports.split(",") if t.strip())
    unknown = sorted(set(transports) - set(TRANSPORTS))
    if unknown or not transports:
        parser.error(f"--transports: unknown {unknown}; choose from {', '.join(TRANSPORTS)}")
    seconds = args.seconds if args.seconds else (args.minutes or 5) * 60
    settings = Settings(
        clients=4 if args.short else args.clients,
        seconds=15 if args.short else seconds,
        disconnect_fraction=args.disconnect_fraction
        if args.disconnect_fraction is not None
        else (0.5 if args.short else 0.2),
        transports=transports,
        max_tokens=8 if args.short else args.max_tokens,
        max_queue=2 if args.short and args.max_queue is None else args.max_queue,
        timeout_s=args.timeout,
        sample_s=0.5 if args.short else max(0.5, min(5.0, seconds / 120)),
        seed=args.seed,
        enforce_rss=not args.short,
        threads=args.threads,
        keep_log=args.server_log,
    )
    report = run(settings)
    if not args.json:
        print(table(report))
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
