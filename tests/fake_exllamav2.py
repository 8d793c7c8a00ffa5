"""A stand-in for the parts of exllamav2 that ExLlamaV2Engine touches, written from the library's
source (turboderp-org/exllamav2: generator/dynamic_async.py, generator/dynamic.py,
generator/sampler.py, tokenizer/tokenizer.py), so the engine's job lifecycle runs on a CPU.

What is kept from the real thing, because the engine depends on it:
- ExLlamaV2DynamicJobAsync enqueues itself on construction, is an async iterator of result dicts
  that ends after the result with `eos: True`, and `await job.cancel()` asserts the job is still
  known to the generator (cancelling a finished job is an AssertionError there too).
- The generator forgets a job when it emits its eos result and sets `job.job.is_finished`.
- Text that may begin a stop string is held back; a `stop_token` eos emits no `text` and puts
  the held text, followed by the stop token's piece, under `held`.
- Result dicts: `text` (absent when there is none, and on a `stop_token` eos), `eos`,
  `eos_reason`, `new_tokens` (counting the sampled stop token), `identifier`, and with
  return_probs / return_top_tokens: token_ids [1,T], token_probs [1,T], top_k_tokens [1,T,K],
  top_k_probs [1,T,K].
- ExLlamaV2Sampler.Settings is a dataclass with the library's (non-neutral) defaults.
Unlike the real job, the fake refuses keyword arguments it does not know (the real one swallows
them in **kwargs), so a misspelt option fails here instead of being silently ignored.

The "model" replays `script`, a list of token ids, then samples EOS.
"""

from __future__ import annotations

import asyncio
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

PIECES = ["<unk>", "<s>", "</s>", "Hello", ",", " world", "!", " END", " again", "\u00e9"]
BOS_ID, EOS_ID = 1, 2
HELLO_WORLD = [3, 4, 5, 6]


class FakeTokenizer:
    """ExLlamaV2Tokenizer's encode(): a [1, n] tensor; here one token per character."""

    bos_token = "<s>"
    eos_token = "</s>"
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID

    def __init__(self) -> None:
        self.encoded: list[tuple[str, bool]] = []

    def encode(
        self,
        text: str,
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
        return_offsets: bool = False,
        embeddings: list[Any] | None = None,
    ) -> torch.Tensor:
        self.encoded.append((text, encode_special_tokens))
        ids = [BOS_ID] if add_bos else []
        # As the library does: "<s>" and "</s>" in the text are BOS and EOS only when special
        # tokens are encoded; otherwise they are characters like any other.
        pieces = re.split(r"(</?s>)", text) if encode_special_tokens else [text]
        for piece in pieces:
            if piece in (self.bos_token, self.eos_token) and encode_special_tokens:
                ids.append(BOS_ID if piece == self.bos_token else EOS_ID)
            else:
                ids += [10 + ord(c) % 100 for c in piece]
        if add_eos:
            ids.append(EOS_ID)
        return torch.tensor([ids], dtype=torch.long)


@dataclass
class Settings:
    """ExLlamaV2Sampler.Settings: the fields and defaults of the library's dataclass."""

    token_repetition_penalty: float = 1.025
    token_repetition_range: int = -1
    token_repetition_decay: int = 0
    token_frequency_penalty: float = 0.0
    token_presence_penalty: float = 0.0
    temperature: float = 0.8
    smoothing_factor: float = 0.0
    min_temp: float = 0
    max_temp: float = 0.0
    temp_exponent: float = 1.0
    top_k: int = 50
    top_p: float = 0.8
    top_a: float = 0.0
    min_p: float = 0
    tfs: float = 0
    typical: float = 0
    skew: float = 0
    temperature_last: bool = False
    mirostat: bool = False
    mirostat_tau: float = 1.5
    mirostat_eta: float = 0.1
    token_bias: torch.Tensor | None = None
    cfg_scale: float | None = None
    post_sampling_hooks: list[Any] = field(default_factory=list)
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0


class ExLlamaV2Sampler:
    Settings = Settings


class FakeDynamicJob:
    """ExLlamaV2DynamicJob's constructor signature, minus **kwargs."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        max_skips: int | None = 4,
        gen_settings: Settings | None = None,
        seed: int | None = None,
        stop_conditions: list[int | str] | None = None,
        decode_special_tokens: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        return_probs: bool = False,
        filters: list[Any] | None = None,
        filter_prefer_eos: bool = False,
        token_healing: bool = False,
        identifier: object | None = None,
        banned_strings: list[str] | None = None,
        embeddings: list[Any] | None = None,
    ) -> None:
        assert input_ids.device.type == "cpu", "input_ids must reside in system memory"
        assert input_ids.shape[0] == 1 and input_ids.shape[-1] > 0
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.gen_settings = gen_settings
        self.seed = seed
        self.stop_tokens = {t for t in stop_conditions or [] if isinstance(t, int)}
        self.stop_strings = {t for t in stop_conditions or [] if isinstance(t, str)}
        if any(not isinstance(t, int | str) for t in stop_conditions or []):
            raise ValueError("Unsupported type in stop_conditions")
        self.decode_special_tokens = decode_special_tokens
        self.return_top_tokens = return_top_tokens
        self.return_probs = return_probs
        self.identifier = identifier
        self.new_tokens = 0
        self.is_finished = False


class FakeDynamicGeneratorAsync:
    """ExLlamaV2DynamicGeneratorAsync: jobs by their sync job, one task streaming each."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.jobs: dict[FakeDynamicJob, FakeDynamicJobAsync] = {}
        self.made: list[FakeDynamicJob] = []
        self.cancelled: list[FakeDynamicJob] = []
        self.closed = False
        self._tasks: list[asyncio.Task[None]] = []

    def enqueue(self, job: FakeDynamicJobAsync) -> None:
        assert job.job not in self.jobs
        self.jobs[job.job] = job
        self.made.append(job.job)
        self._tasks.append(asyncio.get_running_loop().create_task(self._stream(job)))

    async def cancel(self, job: FakeDynamicJobAsync) -> None:
        assert job.job in self.jobs
        del self.jobs[job.job]
        self.cancelled.append(job.job)

    async def close(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()

    async def _stream(self, async_job: FakeDynamicJobAsync) -> None:
        job = async_job.job
        completion = held = ""
        for token in [*self.script, EOS_ID]:
            # Paced like a GPU slower than its consumer: one result waiting at a time.
            while not async_job.queue.empty():  # noqa: ASYNC110 (the queue is the library's)
                await asyncio.sleep(0)
            if job not in self.jobs:  # cancelled
                return
            job.new_tokens += 1
            result: dict[str, Any] = {"job": job, "stage": "streaming", "eos": False}
            if job.identifier is not None:
                result["identifier"] = job.identifier
            if token in job.stop_tokens:
                # A stop_token eos emits no text: what was held back, and the stop token's own
                # piece, go under "held".
                result.update(eos=True, eos_reason="stop_token", eos_triggering_token_id=token)
                if held + PIECES[token]:
                    result["held"] = {"text": held + PIECES[token]}
            else:
                piece, held = held + PIECES[token], ""
                hit = next((s for s in job.stop_strings if s in completion + piece), None)
                if hit is not None:
                    piece = (completion + piece)[len(completion) : (completion + piece).index(hit)]
                    result.update(eos=True, eos_reason="stop_string", eos_triggering_string=hit)
                elif job.new_tokens >= job.max_new_tokens:
                    result.update(eos=True, eos_reason="max_new_tokens")
                else:
                    # Hold back an ending that may grow into a stop string.
                    size = max(
                        (
                            n
                            for s in job.stop_strings
                            for n in range(1, len(s))
                            if piece.endswith(s[:n])
                        ),
                        default=0,
                    )
                    piece, held = piece[: len(piece) - size], piece[len(piece) - size :]
                if piece:
                    result["text"] = piece
                completion += piece
                self._add_probs(job, token, result)
            if result["eos"]:
                job.is_finished = True
                result.update(full_completion=completion, new_tokens=job.new_tokens)
                del self.jobs[job]
            await async_job.put_result(result)
            if result["eos"]:
                return

    @staticmethod
    def _add_probs(job: FakeDynamicJob, token: int, result: dict[str, Any]) -> None:
        """Probabilities that make the chosen token the most likely: 0.5, then 0.3, 0.1, ..."""
        if job.return_probs:
            result["token_ids"] = torch.tensor([[token]])
            result["token_probs"] = torch.tensor([[0.5]])
        if job.return_top_tokens > 0:
            k = job.return_top_tokens
            others = [t for t in range(3, len(PIECES)) if t != token][: k - 1]
            result["top_k_tokens"] = torch.tensor([[[token, *others]]])
            result["top_k_probs"] = torch.tensor([[[0.5, *[0.3 / (i + 1) for i in range(k - 1)]]]])


class FakeDynamicJobAsync:
    """ExLlamaV2DynamicJobAsync, as the library writes it."""

    def __init__(self, generator: FakeDynamicGeneratorAsync, *args: Any, **kwargs: Any) -> None:
        self.generator = generator
        self.job = FakeDynamicJob(*args, **kwargs)
        self.queue: asyncio.Queue[dict[str, Any] | Exception] = asyncio.Queue()
        self.cancelled = False
        self.generator.enqueue(self)

    async def put_result(self, result: dict[str, Any] | Exception) -> None:
        await self.queue.put(result)

    async def __aiter__(self) -> Any:
        while True:
            if self.cancelled:
                break
            result = await self.queue.get()
            if isinstance(result, Exception):
                raise result
            yield result
            if result["eos"]:
                break

    async def cancel(self) -> None:
        await self.generator.cancel(self)
        self.cancelled = True


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import exllamav2` and `from exllamav2.generator import ...` find the fakes."""
    package = types.ModuleType("exllamav2")
    generator = types.ModuleType("exllamav2.generator")
    generator.ExLlamaV2DynamicGeneratorAsync = FakeDynamicGeneratorAsync  # type: ignore[attr-defined]
    generator.ExLlamaV2DynamicJobAsync = FakeDynamicJobAsync  # type: ignore[attr-defined]
    generator.ExLlamaV2Sampler = ExLlamaV2Sampler  # type: ignore[attr-defined]
    package.generator = generator  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exllamav2", package)
    monkeypatch.setitem(sys.modules, "exllamav2.generator", generator)
