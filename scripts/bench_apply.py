"""Live reconfiguration under load: for each kind of change, the time from `POST /admin/config`
to its effect, and the p99 (and p50) latency of the requests in flight while it lands against
the same sample taken in a quiet window just before (the requests in flight over an interval
as long: a request in flight at a given moment is likelier a long one, on both sides).

    .venv/bin/python scripts/bench_apply.py [--repeats 3] [--window 8] [--max-tokens 32]

One served `python -m runtime` (env=test, the packaged Gemma 3 270M, gRPC on) under one
streaming client per transport (HTTP, gRPC, WebSocket, GraphQL: the soak test's clients),
sending back to back. Each change is applied `--repeats` times, alternating with its inverse
(an upstream added, then removed...), each apply preceded by a quiet window. The effect is
seen from outside: a request to the new upstream's model answers (or 404s), the new key
authenticates (or 401s), `GET /admin/config` shows the new value. Configs are composed here
with Hydra (as `python -m runtime apply` does) and posted directly, so the timing is the
server's. The OpenAI-compatible upstream is bench_proxy.py's (answers at once). Prints a
table, the machine's load, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime.config import compose
from scripts.bench_inference import ROOT, free_port, serving
from scripts.soak_clients import BackToBack, Outcome, Target

KEY = "k-bench-admin"
ADMIN = {"authorization": f"Bearer {KEY}"}
OPS = f"{{name:ops,key:{KEY},scopes:[admin,inference]}}"
GEMMA = "integrations.custom_models.settings.models.0"


@dataclass
class Change:
    """A change and its inverse, as overrides, and how to see each from outside."""

    name: str
    overrides: list[str]
    undo: list[str]
    seen: Callable[[httpx.Client], bool]
    undone: Callable[[httpx.Client], bool]


def config_value(client: httpx.Client, *path: str) -> Any:
    value: Any = client.get("/admin/config", headers=ADMIN).json()["config"]
    for key in path:
        value = value[key]
    return value


def changes(upstream: str) -> list[Change]:
    up = [
        "+integrations=openai_compatible",
        f"integrations.openai_compatible.settings.base_url={upstream}/v1",
        "integrations.openai_compatible.settings.model_prefix=up/",
    ]
    two_keys = f"auth.keys=[{OPS},{{name:app,key:k-bench-app}}]"

    def answers(client: httpx.Client, model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return client.post("/v1/chat/completions", json=body, headers=ADMIN).status_code

    def app_key(client: httpx.Client) -> int:
        headers = {"authorization": "Bearer k-bench-app"}
        return client.get("/v1/models", headers=headers).status_code

    def threads(client: httpx.Client) -> Any:
        models = config_value(client, "integrations", "custom_models", "settings", "models")
        return models[0]["engine_settings"].get("n_threads")

    return [
        Change(  # the control: the running config again, so the plan is empty
            "nothing (the same config)", [], [], lambda c: True, lambda c: True
        ),
        Change(
            "upstream added / removed",
            up,
            [],
            lambda c: answers(c, "up/echo") == 200,
            lambda c: answers(c, "up/echo") == 404,
        ),
        Change(
            "model reloaded (n_threads)",
            [f"+{GEMMA}.engine_settings.n_threads=1"],
            [],
            lambda c: threads(c) == 1,
            lambda c: threads(c) is None,
        ),
        Change(
            "key added / revoked",
            [two_keys],
            [],
            lambda c: app_key(c) == 200,
            lambda c: app_key(c) == 401,
        ),
        Change(
            "log level",
            ["logging.level=DEBUG"],
            [],
            lambda c: config_value(c, "logging", "level") == "DEBUG",
            lambda c: config_value(c, "logging", "level") == "INFO",
        ),
        Change(
            "tracing on / off",
            ["telemetry.tracing=true"],
            [],
            lambda c: config_value(c, "telemetry", "tracing") is True,
            lambda c: config_value(c, "telemetry", "tracing") is False,
        ),
    ]


def overlapping(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    """The requests in flight at some moment of [start, end] (monotonic clock)."""
    return [
        o
        for o in outcomes
        if o.latency_s is not None and o.started < end and o.started + o.latency_s > start
    ]


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="applies of each change")
    parser.add_argument("--window", type=float, default=8.0, help="seconds watched per apply")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-apply-"))
    up_port, http_port, grpc_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    base = [
        "env=test",
        f"server.http_port={http_port}",
        f"server.run_dir={work / 'runs'}",
        "logging.level=INFO",
        "transports.grpc=true",
        f"server.grpc_port={grpc_port}",
        f"integrations.custom_models.settings.cache_dir={work / 'models'}",
        f"integrations.custom_models.settings.models_dir={work / 'none'}",
        f"auth.keys=[{OPS}]",
    ]
    proxy = str(ROOT / "scripts/bench_proxy.py")
    upstream_command = [sys.executable, proxy, "--serve-upstream", str(up_port)]
    server = f"http://127.0.0.1:{http_port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_DO_NOT_TRACK": "true"}
    os.environ.update(env)
    rows: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()[0]]
    with (
        serving(upstream_command, upstream + "/v1/models", work / "upstream.log"),
        serving([sys.executable, "-m", "runtime", *base], server + "/readyz", work / "serve.log"),
        httpx.Client(base_url=server, timeout=120) as client,
    ):
        target = Target(server, f"127.0.0.1:{grpc_port}", "gemma-3-270m", args.max_tokens, 120, KEY)
        load = BackToBack(target)
        load.start()
        time.sleep(args.window)  # warm: every transport connected, the model's caches used
        for change in changes(upstream):
            effects: list[float] = []
            during: list[float] = []
            quiet: list[float] = []
            failed = 0
            for repeat in range(args.repeats):
                forward = repeat % 2 == 0
                overrides = change.overrides if forward else change.undo
                check = change.seen if forward else change.undone
                # Composed first: Hydra's CPU time is the client's, not the apply's.
                cfg = compose([*base, *overrides])
                body = {"config": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)}
                quiet_start = time.monotonic()
                time.sleep(args.window)
                started = time.monotonic()
                answer = client.post("/admin/config", json=body, headers=ADMIN)
                if answer.status_code != 200:
                    raise SystemExit(f"{change.name}: {answer.status_code} {answer.text}")
                while not check(client):
                    time.sleep(0.05)
                effect = time.monotonic()
                effects.append(effect - started)
                time.sleep(args.window)
                ended = time.monotonic()
                window = overlapping(load.outcomes, started, effect)
                during += [o.latency_s for o in window if o.latency_s is not None]
                # The same sample without an apply: the requests in flight over an interval as
                # long, in the middle of the quiet window (a request in flight at a given moment
                # is likelier a long one, so both sides are sampled the same way).
                middle = quiet_start + args.window / 2
                calm = overlapping(load.outcomes, middle, middle + (effect - started))
                quiet += [o.latency_s for o in calm if o.latency_s is not None]
                failed += sum(
                    1 for o in overlapping(load.outcomes, started, ended) if o.kind != "served"
                )
                loads.append(os.getloadavg()[0])
                print(f"  {change.name}: {'apply' if forward else 'undo'} {effects[-1]:.3f}s")
            rows[change.name] = {
                "applies": args.repeats,
                "effect_p50_ms": statistics.median(effects) * 1000,
                "effect_max_ms": max(effects) * 1000,
                "in_flight": len(during),
                "quiet": len(quiet),
                "p99_during_s": p99(during),
                "p99_without_s": p99(quiet),
                "p99_ratio": p99(during) / p99(quiet),
                "p50_ratio": statistics.median(during) / statistics.median(quiet),
                "failed": failed,
            }
            # Back to the base config before the next kind of change.
            cfg = compose(base)
            body = {"config": OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)}
            client.post("/admin/config", json=body, headers=ADMIN).raise_for_status()
        load.stopping.set()
        load.join(timeout=180)
    bad = [o for o in load.outcomes if o.kind != "served"]
    print()
    columns = [
        "change",
        "applies",
        "apply to effect p50 / max (ms)",
        "requests sampled (during / without)",
        "p99 during (s)",
        "p99 without (s)",
        "p99 ratio",
        "p50 ratio",
        "failed",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for name, row in rows.items():
        print(
            f"| {name} | {row['applies']} | {row['effect_p50_ms']:.0f} / {row['effect_max_ms']:.0f}"
            f" | {row['in_flight']} / {row['quiet']} | {row['p99_during_s']:.2f}"
            f" | {row['p99_without_s']:.2f} | {row['p99_ratio']:.2f} | {row['p50_ratio']:.2f}"
            f" | {row['failed']} |"
        )
    print(
        f"\nrequests: {len(load.outcomes)}, not served: {len(bad)}; load average (1 min)"
        f" {min(loads):.1f}-{max(loads):.1f}"
    )
    print(
        json.dumps(
            {
                "rows": rows,
                "requests": len(load.outcomes),
                "not_served": len(bad),
                "load_avg_1m": [min(loads), max(loads)],
            }
        )
    )
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
