"""Embeddings with sentence-transformers. Concurrent requests are batched: one consumer task
takes what queued while the last batch ran, waits `batch_window_ms` for more (up to
`batch_size` texts in all), and encodes it in one call on a worker thread.

Everything a batch costs in Python happens on that thread too (counting its tokens, turning the
vectors into lists): the event loop only hands the results out, so it stays free to parse the
next requests and send the last answers while the model runs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from runtime.types import EMBEDDINGS, Chunk, Embeddings, EngineError, GenerationRequest

_Pending = tuple[list[str], "asyncio.Future[Embeddings]"]


class SentenceTransformerEngine:
    """A sentence-transformers model directory (e.g. the packaged all-MiniLM-L6-v2)."""

    capabilities = frozenset({EMBEDDINGS})

    def __init__(self, path: Path, settings: dict[str, Any] | None = None) -> None:
        settings = settings or {}
        self.path = path
        self.device = str(settings.get("device", "cpu"))
        self.batch_size = int(settings.get("batch_size", 64))
        self.batch_window_s = float(settings.get("batch_window_ms", 2.0)) / 1000
        self.normalize = bool(settings.get("normalize", False))
        self._model: Any = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._batches = 0
        self._texts = 0
        self._threads = 0

    async def load(self) -> None:
        self._model, self._threads = await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._consumer = asyncio.get_running_loop().create_task(self._consume())

    async def unload(self) -> None:
        queue, self._queue = self._queue, None  # new calls fail from here on
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        self._consumer = None
        # Calls still queued would otherwise wait forever for a consumer that is gone.
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()], "the embedding model was unloaded")
        self._model = None

    def _load(self) -> tuple[Any, int]:
        import torch
        from sentence_transformers import SentenceTransformer

        # Read on an executor thread, as encode runs: the threads one encode is spread over.
        model = SentenceTransformer(str(self.path), device=self.device)
        return model, int(torch.get_num_threads())

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        raise EngineError(f"{request.model} is an embedding model; it cannot generate text")

    def tokenize(self, text: str) -> list[int]:
        return list(self._model.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        if self._queue is None:
            raise EngineError("embedding model is not loaded")
        future: asyncio.Future[Embeddings] = asyncio.get_running_loop().create_future()
        await self._queue.put((list(texts), future))
        return await future

    def stats(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "threads": self._threads,
            "batch_size": self.batch_size,
            "batches": self._batches,
            "texts": self._texts,
        }

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            try:
                size = len(batch[0][0])
                deadline = time.monotonic() + self.batch_window_s
                while size < self.batch_size:
                    if not self._queue.empty():  # queued while the last batch ran
                        item = self._queue.get_nowait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            item = await asyncio.wait_for(self._queue.get(), remaining)
                        except TimeoutError:
                            break
                    batch.append(item)
                    size += len(item[0])
                await self._encode(batch)
            except asyncio.CancelledError:
                _fail(batch, "the embedding model was unloaded")
                raise

    async def _encode(self, batch: list[_Pending]) -> None:
        texts = [text for item, _ in batch for text in item]
        try:
            # The model as it is now: an unload while the thread runs leaves it this batch.
            vectors, counts, finite = await asyncio.to_thread(self._run, self._model, texts)
        except Exception as exc:
            _fail(batch, f"embedding failed: {exc}")
            return
        self._batches += 1
        self._texts += len(texts)
        offset = 0
        for item, future in batch:
            rows = slice(offset, offset + len(item))
            offset = rows.stop
            if future.done():
                continue
            if not all(finite[rows]):
                # JSON cannot carry NaN or infinity, and no caller could use such a vector.
                reason = "embedding failed: the model produced a vector that is not finite"
                future.set_exception(EngineError(reason))
                continue
            result = Embeddings(vectors=vectors[rows], prompt_tokens=sum(counts[rows]))
            future.set_result(result)

    def _run(self, model: Any, texts: list[str]) -> tuple[list[list[float]], list[int], list[bool]]:
        """On the worker thread: the vectors as lists, each text's tokens as `tokenize` counts
        them (not truncated to the model's max_seq_length, unlike what the model sees), and
        whether each vector is finite."""
        import numpy

        ids = model.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        matrix = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            convert_to_numpy=True,
        )
        finite: list[bool] = numpy.isfinite(matrix).all(axis=1).tolist()
        vectors: list[list[float]] = matrix.tolist()
        return vectors, [len(row) for row in ids], finite


def _fail(batch: list[_Pending], reason: str) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(EngineError(reason))
