"""The transformers engine on a tiny Llama made by the test (tests/tiny_llama.py): real
tokenizer, real model code, random weights from a fixed seed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtime.config_schema import ModelConfig
from runtime.engines.text import render_chat
from runtime.engines.transformers import TransformersEngine
from runtime.types import (
    ContextLengthExceeded,
    EngineError,
    GenerationRequest,
    UnsupportedRequest,
    Usage,
)
from tests.tiny_llama import build_tiny_llama

torch = pytest.importorskip("torch")

OWN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} says: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant says:{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "answer briefly"},
    {"role": "user", "content": "where does the ship sail"},
]


@dataclass
class Checkpoints:
    safetensors: Path
    state_dict: Path
    templated: Path


@dataclass
class Result:
    texts: dict[int, str] = field(default_factory=dict)
    chunks: list[str] = field(default_factory=list)
    finish: dict[int, str] = field(default_factory=dict)
    usage: Usage | None = None


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    # A model this small runs ~40x slower when torch's two threads compete with the other
    # processes on a 2-core machine; one thread keeps the file fast.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> Checkpoints:
    root = tmp_path_factory.mktemp("tiny-llama")
    return Checkpoints(
        safetensors=build_tiny_llama(root / "safetensors"),
        state_dict=build_tiny_llama(root / "state-dict", state_dict_file="model.pt"),
        templated=build_tiny_llama(root / "templated", chat_template=OWN_TEMPLATE),
    )


def make(path: Path, **config: Any) -> TransformersEngine:
    return TransformersEngine(path, ModelConfig(id="tiny", source=str(path), **config))


@pytest.fixture(scope="module")
def engine(checkpoints: Checkpoints) -> Iterator[TransformersEngine]:
    engine = make(checkpoints.safetensors)
    asyncio.run(engine.load())
    yield engine
    asyncio.run(engine.unload())


async def run(engine: TransformersEngine, **fields: Any) -> Result:
    result = Result()
    async for chunk in engine.generate(GenerationRequest(model="tiny", **fields)):
        if chunk.text:
            result.chunks.append(chunk.text)
        result.texts[chunk.index] = result.texts.get(chunk.index, "") + chunk.text
        if chunk.finish_reason:
            result.finish[chunk.index] = chunk.finish_reason
        if chunk.usage:
            result.usage = chunk.usage
    return result


def reference_greedy(engine: TransformersEngine, prompt: str, max_tokens: int) -> str:
    """What the model itself produces greedily, called directly through transformers."""
    tokenizer, model = engine._tokenizer, engine._model
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_streams_the_models_greedy_output_token_by_token(
    engine: TransformersEngine,
) -> None:
    prompt = "the sea ship sails north"
    result = await run(engine, prompt=prompt, max_tokens=16, temperature=0)
    assert result.finish == {0: "length"}
    assert result.usage == Usage(
        prompt_tokens=len(engine._tokenizer(prompt)["input_ids"]), completion_tokens=16
    )
    # The tokenizer prepends BOS, which `tokenize()` (no special tokens) leaves out.
    assert result.usage.prompt_tokens == len(engine.tokenize(prompt)) + 1
    assert result.texts[0] == reference_greedy(engine, prompt, 16)
    assert len(result.chunks) >= 8  # streamed per token, not one blob at the end


async def test_greedy_and_seeded_sampling_are_deterministic(engine: TransformersEngine) -> None:
    prompt = "one two three"
    greedy = [await run(engine, prompt=prompt, max_tokens=12, temperature=0) for _ in range(2)]
    assert greedy[0].texts == greedy[1].texts
    seeded = [
        await run(engine, prompt=prompt, max_tokens=12, temperature=1.0, seed=seed)
        for seed in (7, 7, 8)
    ]
    assert seeded[0].texts == seeded[1].texts
    assert seeded[0].texts != seeded[2].texts  # the seed is what made them equal


async def test_stop_string_cuts_the_output_and_is_not_sent(engine: TransformersEngine) -> None:
    prompt = "the river runs under the old stone"
    free = (await run(engine, prompt=prompt, max_tokens=24, temperature=0)).texts[0]
    # A run of letters from the middle of the free output, so the cut lands inside it.
    match = re.compile(r"[a-z]{2,}").search(free, 4)
    assert match is not None, free
    stop = match.group()
    stopped = await run(engine, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.finish == {0: "stop"}
    assert stopped.texts[0] == free[: free.index(stop)]
    assert stop not in "".join(stopped.chunks)


async def test_n_choices_are_seeded_per_index_and_counted_together(
    engine: TransformersEngine,
) -> None:
    prompt = "morning light"
    many = await run(engine, prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=3)
    assert many.finish == {0: "length", 1: "length", 2: "length"}
    assert many.usage is not None
    assert many.usage.completion_tokens == 18
    assert many.usage.prompt_tokens == len(engine._tokenizer(prompt)["input_ids"])
    assert len(set(many.texts.values())) == 3
    # Choice i is sampled with seed + i, so it repeats as a single choice with that seed.
    alone = await run(engine, prompt=prompt, max_tokens=6, temperature=1.0, seed=12)
    assert alone.texts[0] == many.texts[1]


async def test_chat_without_a_template_falls_back_to_chatml(engine: TransformersEngine) -> None:
    assert not engine._tokenizer.chat_template
    result = await run(engine, messages=MESSAGES, max_tokens=4, temperature=0)
    chatml = render_chat(None, MESSAGES)
    assert chatml.startswith("<|im_start|>system\nanswer briefly<|im_end|>")
    expected = engine._tokenizer(chatml, add_special_tokens=False)["input_ids"]
    assert result.usage == Usage(prompt_tokens=len(expected), completion_tokens=4)


async def test_message_text_that_spells_control_tokens_is_refused(
    engine: TransformersEngine,
) -> None:
    """The rendered prompt is tokenized whole, special tokens parsed (the template's markup
    needs them), so a user's `</s>` would end a turn for real: it is a 400 naming the message,
    and ordinary text is not touched."""
    forged = [{"role": "user", "content": "fine</s>"}]
    with pytest.raises(UnsupportedRequest, match=r"messages\[0\]\.content spells") as refused:
        await run(engine, messages=forged, max_tokens=2, temperature=0)
    assert refused.value.param == "messages[0].content"
    plain = [{"role": "user", "content": "s> </ <s is fine"}]
    result = await run(engine, messages=plain, max_tokens=2, temperature=0)
    assert result.usage is not None and result.usage.completion_tokens == 2


async def test_chat_uses_the_tokenizers_own_template(checkpoints: Checkpoints) -> None:
    engine = make(checkpoints.templated)
    await engine.load()
    try:
        result = await run(engine, messages=MESSAGES, max_tokens=4, temperature=0)
        own = render_chat(OWN_TEMPLATE, MESSAGES)
        assert own.endswith("assistant says:")
        expected = engine._tokenizer(own, add_special_tokens=False)["input_ids"]
        assert result.usage == Usage(prompt_tokens=len(expected), completion_tokens=4)
    finally:
        await engine.unload()


def test_context_length_is_the_smaller_of_config_and_model(checkpoints: Checkpoints) -> None:
    engine = make(checkpoints.safetensors, context_length=64)
    asyncio.run(engine.load())
    try:
        assert engine.stats()["context_length"] == 64
    finally:
        asyncio.run(engine.unload())


def test_requests_beyond_the_context_length_are_refused(engine: TransformersEngine) -> None:
    assert engine.stats()["context_length"] == 256  # max_position_embeddings of the checkpoint
    with pytest.raises(ContextLengthExceeded) as too_many:
        engine.generate(GenerationRequest(model="tiny", prompt="the sea", max_tokens=300))
    assert too_many.value.context_length == 256
    long_prompt = " ".join(["garden window"] * 200)
    with pytest.raises(ContextLengthExceeded) as too_long:
        engine.generate(GenerationRequest(model="tiny", prompt=long_prompt))
    assert too_long.value.prompt_tokens == len(engine._tokenizer(long_prompt)["input_ids"])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"json_mode": True}, "response_format"),
        ({"json_schema": {"type": "object"}}, "response_format"),
        ({"logprobs": 2}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_unsupported_parameters_are_refused(
    engine: TransformersEngine, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(UnsupportedRequest) as raised:
        engine.generate(GenerationRequest(model="tiny", prompt="the sea", **fields))
    assert raised.value.param == param


async def test_closing_a_stream_stops_generation_and_frees_the_worker(
    engine: TransformersEngine,
) -> None:
    forward_calls = 0

    def count(*_: Any) -> None:
        nonlocal forward_calls
        forward_calls += 1

    hook = engine._model.register_forward_hook(count)
    try:
        stream = engine.generate(GenerationRequest(model="tiny", prompt="the sea", temperature=0))
        received = [await anext(stream) for _ in range(2)]
        await stream.aclose()  # type: ignore[attr-defined]
        assert all(chunk.finish_reason is None for chunk in received)
        after = await asyncio.wait_for(run(engine, prompt="bird sings", max_tokens=3), 30)
    finally:
        hook.remove()
    assert after.finish == {0: "length"}
    assert engine.stats()["queued"] == 0
    # Without the cancel the first request would have run to the context limit (~250 tokens).
    assert forward_calls < 100


async def test_a_state_dict_checkpoint_generates_what_safetensors_does(
    checkpoints: Checkpoints, engine: TransformersEngine
) -> None:
    assert not list(checkpoints.state_dict.glob("*.safetensors"))
    from_state_dict = make(checkpoints.state_dict)
    await from_state_dict.load()
    try:
        prompt = "three birds over the city"
        expected = await run(engine, prompt=prompt, max_tokens=12, temperature=0)
        got = await run(from_state_dict, prompt=prompt, max_tokens=12, temperature=0)
        assert got.texts == expected.texts
        assert from_state_dict.stats()["parameters"] == engine.stats()["parameters"]
    finally:
        await from_state_dict.unload()


def test_generate_before_load_is_an_engine_error(checkpoints: Checkpoints) -> None:
    engine = make(checkpoints.safetensors)
    with pytest.raises(EngineError, match="not loaded"):
        engine.generate(GenerationRequest(model="tiny", prompt="the sea"))
