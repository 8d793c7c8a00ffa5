"""How scripts/bench_concurrency.py gets its streams, measured as `Stream`s: over HTTP
(`http_stream`, `http_wave`: streamed completions from a served system), or directly (`Direct`:
the packaged model driven with llama-cpp-python's low-level API in the benchmark's own process,
every sequence of a wave in one `llama_batch` per `llama_decode`, argmax in numpy; no HTTP, no
sampler: the limit of the machine)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

MODEL_ID = "gemma-3-270m"
# Greedy, every knob sent: the servers' defaults differ (Tiffin's model defaults sample at
# temperature 1.0; llama-cpp-python's server has repeat_penalty 1.1 and min_p 0.05).
GREEDY: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
GREEDY |= {"repeat_penalty": 1.0}


@dataclass
class Stream:
    """One request of a wave, in seconds from the wave's start."""

    tokens: int = 0
    times: list[float] = field(default_factory=list)  # arrival of each streamed piece

    @property
    def ttft(self) -> float | None:
        return self.times[0] if self.times else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


class Direct:
    """The packaged model loaded with llama-cpp-python's low-level API; one context per wave
    size (n_seq_max = the size, unified KV cache), kept for the whole run and cleared per wave."""

    def __init__(self, model: Path, threads: int, max_tokens: int) -> None:
        import llama_cpp

        # llama.cpp logs every load and context at any level to stderr: keep the table clean.
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self._quiet, None)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.threads = threads
        self.max_tokens = max_tokens
        self.contexts: dict[int, tuple[Any, Any]] = {}  # sequences -> (context, batch)

    def _context(self, sequences: int) -> tuple[Any, Any]:
        import llama_cpp

        if sequences not in self.contexts:
            params = llama_cpp.llama_context_default_params()
            per_sequence = 64 + self.max_tokens + 16  # prompts are ~20 tokens
            params.n_ctx = max(512, -(-sequences * per_sequence // 256) * 256)
            params.n_batch = params.n_ubatch = 512
            params.n_seq_max = sequences
            params.kv_unified = True
            params.n_threads = params.n_threads_batch = self.threads
            context = llama_cpp.llama_init_from_model(self.model, params)
            if not context:
                raise RuntimeError(f"llama.cpp could not make a context for {sequences} sequences")
            batch = llama_cpp.llama_batch_init(512, 0, 1)
            self.contexts[sequences] = (context, batch)
        return self.contexts[sequences]

    def _tokenize(self, text: str) -> list[int]:
        import llama_cpp

        data = text.encode()
        buffer = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, len(buffer), True, False
        )
        return list(buffer[:count])

    def _piece(self, token: int, buffer: Any) -> bytes:
        import llama_cpp

        count = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return bytes(buffer.raw[: max(count, 0)])

    def wave(self, texts: list[str], max_tokens: int, limit_s: float) -> list[Stream]:
        """All prompts prefilled in one batch (each one's last token gives logits), then one
        token per sequence per `llama_decode`; tokenizing and detokenizing are timed too."""
        import ctypes

        import llama_cpp
        import numpy as np

        context, batch = self._context(len(texts))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
        piece_buffer = ctypes.create_string_buffer(256)
        streams = [Stream() for _ in texts]
        start = time.perf_counter()
        tokenized = [self._tokenize(text) for text in texts]
        if sum(map(len, tokenized)) > 512:
            raise RuntimeError("the prompts of one wave must fit one 512-token batch")
        slot = 0
        for sequence, tokens in enumerate(tokenized):
            for position, token in enumerate(tokens):
                put(batch, slot, token, position, sequence, position == len(tokens) - 1)
                slot += 1
        batch.n_tokens = slot
        positions = [len(tokens) for tokens in tokenized]
        for step in range(max_tokens):
            if (status := llama_cpp.llama_decode(context, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            # One row per output token, in batch order: here, sequence order.
            rows = llama_cpp.llama_get_logits(context)
            chosen = np.ctypeslib.as_array(rows, shape=(len(texts), self.n_vocab)).argmax(axis=1)
            now = time.perf_counter() - start
            for sequence, token in enumerate(chosen.tolist()):
                self._piece(token, piece_buffer)
                streams[sequence].times.append(now)
                streams[sequence].tokens += 1
            if step == max_tokens - 1 or now > limit_s:
                break
            for sequence, token in enumerate(chosen.tolist()):
                put(batch, sequence, token, positions[sequence], sequence, True)
                positions[sequence] += 1
            batch.n_tokens = len(texts)
        return streams

    def close(self) -> None:
        import llama_cpp

        for context, batch in self.contexts.values():
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(context)
        self.contexts.clear()
        llama_cpp.llama_model_free(self.model)


def put(batch: Any, slot: int, token: int, position: int, sequence: int, output: bool) -> None:
    batch.token[slot] = token
    batch.pos[slot] = position
    batch.n_seq_id[slot] = 1
    batch.seq_id[slot][0] = sequence
    batch.logits[slot] = output


async def http_stream(
    base: str,
    prompt: str,
    max_tokens: int,
    start: float,
    until: float,
    sampling: dict[str, Any] = GREEDY,
) -> Stream:
    """One streamed completion; times from `start` (the wave's), cut at `until`. Read with a
    minimal HTTP/1.1 reader (a connection of its own, de-chunking, one orjson parse per event):
    the client shares the machine's cores with the server it measures, and httpx's line
    iterator cost about 0.4 ms of CPU a token, which the server's threads then lacked."""
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": max_tokens, **sampling}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    payload = orjson.dumps(body)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
    head += f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection(host, port)
    stream, usage = Stream(), None
    try:
        writer.write(head.encode() + payload)
        status, chunked = await _response_head(reader)
        if status != 200:
            raise RuntimeError(f"{base}: {status} {(await reader.read(300))!r}")
        events = _Events(chunked)
        while data := await reader.read(65536):
            now = time.perf_counter()
            for event in events.feed(data):
                if event == b"[DONE]":
                    continue
                parsed = orjson.loads(event)
                usage = (parsed.get("usage") or {}).get("completion_tokens", usage)
                if any(choice.get("text") for choice in parsed.get("choices") or []):
                    stream.times.append(now)
            if now > until:  # closing the connection ends the stream
                usage = None
                break
    finally:
        writer.close()
    stream.times = [t - start for t in stream.times]
    # llama-cpp-python's server sends no usage in a stream: one piece per token there.
    stream.tokens = int(usage) if usage is not None else len(stream.times)
    return stream


async def _response_head(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status and whether the body is chunked."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = int(head.split(" ", 2)[1])
    return status, "transfer-encoding: chunked" in head


class _Events:
    """Server-sent events' data out of a byte stream, de-chunked when it is chunked; lines end
    in \n or \r\n (sse-starlette's)."""

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.raw = b""  # chunked bytes not yet de-chunked
        self.text = b""  # de-chunked bytes not yet split into lines

    def feed(self, data: bytes) -> list[bytes]:
        if self.chunked:
            self.raw += data
            while (line_end := self.raw.find(b"\r\n")) >= 0:
                size = int(self.raw[:line_end].split(b";")[0] or b"0", 16)
                if len(self.raw) < line_end + 2 + size + 2:
                    break
                self.text += self.raw[line_end + 2 : line_end + 2 + size]
                self.raw = self.raw[line_end + 2 + size + 2 :]
        else:
            self.text += data
        *lines, self.text = self.text.split(b"\n")
        return [line.rstrip(b"\r")[6:] for line in lines if line.startswith(b"data: ")]


async def http_wave(
    base: str,
    texts: list[str],
    max_tokens: int,
    limit_s: float,
    sampling: dict[str, Any] = GREEDY,
) -> list[Stream]:
    start = time.perf_counter()
    until = start + limit_s
    streams = (http_stream(base, t, max_tokens, start, until, sampling) for t in texts)
    return list(await asyncio.gather(*streams))
