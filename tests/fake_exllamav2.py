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
- The async generator wraps the dynamic generator (`.generator`), whose `iterate()` its one task
  calls while jobs remain: at most `max_batch_size` jobs are active, the rest wait in
  `pending_jobs`, and each step returns results for several jobs. `page_size`, `max_pages` and
  `referenced_pages` are its page table; an eos result carries `prompt_tokens` and
  `cached_tokens`.
Unlike the real job, the fake refuses keyword arguments it does not know (the real one swallows
them in **kwargs), so a misspelt option fails here instead of being silently ignored.

The "model" replays `script`, a list of token ids, then samples EOS.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

PIECES = ["<unk>", "<s>", "</s>", "Hello", ",", " world", "!", " END", " again", "\u00e9"]
BOS_ID, EOS_ID = 1, 2
PAGE_SIZE = 256  # exllamav2's PAGED_PAGE_SIZE
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
    """ExLlamaV2DynamicJob's constructor signature, minus **kwargs; the rest is its state in the
    generator (serial_number, new_tokens, cached_pages, is_finished) and the fake's own."""

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
        self.serial_number: int | None = None
        self.new_tokens = 0
        self.cached_pages = 0
        self.is_finished = False
        # The fake's own: the pages the job holds and what it has output or held back.
        self.page_hashes: list[object] = []
        self.new_unique_pages = 0
        self.allocated_pages: list[FakePage] = []
        self.completion = ""
        self.held = ""


@dataclass(eq=False)
class FakePage:
    """A CachePage: `phash` indexes it in the generator's referenced or unreferenced pages, and
    `kv_position == page_size` means it holds a full page of keys and values."""

    index: int
    phash: object
    access_serial: int
    ref_count: int = 0
    kv_position: int = 0


class FakeDynamicGenerator:
    """ExLlamaV2DynamicGenerator's job queue and page table, as the library keeps them:
    `enqueue` appends to `pending_jobs`; each `iterate()` starts pending jobs while fewer than
    `max_batch_size` are active and the cache has free pages for a job's prompt plus its
    max_new_tokens (a "started" result each), then samples one token for every active job (one
    "streaming" result each); a job that ends releases its pages. Full pages of a prompt are
    hashed by their tokens and everything before them, so a later job with the same prefix reuses
    them (`cached_tokens` in its eos result). Unpaged, the whole cache is one page.
    Simplified: a prompt is ingested in one step, and a job that does not fit is skipped
    without the library's max_skips limit."""

    def __init__(self, script: list[int], max_batch_size: int, cache_tokens: int, paged: bool):
        self.script = script
        self.max_batch_size = max_batch_size
        self.paged = paged
        self.page_size = PAGE_SIZE if paged else cache_tokens
        assert cache_tokens % PAGE_SIZE == 0, "cache.max_seq_len must be a multiple of 256"
        self.max_pages = max(cache_tokens // self.page_size, 1)
        self.max_total_tokens = cache_tokens
        self.job_serial = 0
        self.pending_jobs: list[FakeDynamicJob] = []
        self.active_jobs: list[FakeDynamicJob] = []
        pages = [FakePage(i, ("unused", i), i) for i in range(self.max_pages)]
        self.referenced_pages: dict[object, FakePage] = {}
        self.unreferenced_pages: dict[object, FakePage] = {p.phash: p for p in pages}
        self.access_serial = self.max_pages
        self.iterations = 0

    def enqueue(self, job: FakeDynamicJob) -> int:
        ids = job.input_ids[0].tolist()
        context_pages = (len(ids) - 1) // self.page_size
        total_pages = -(-(len(ids) + job.max_new_tokens) // self.page_size)
        job.page_hashes = [tuple(ids[: (i + 1) * self.page_size]) for i in range(context_pages)]
        job.new_unique_pages = total_pages - context_pages
        assert total_pages <= self.max_pages, f"Job requires {total_pages} pages"
        job.serial_number = self.job_serial
        self.job_serial += 1
        self.pending_jobs.append(job)
        return job.serial_number

    def cancel(self, job: FakeDynamicJob) -> None:
        if job in self.pending_jobs:
            self.pending_jobs.remove(job)
        elif job in self.active_jobs:
            self._deallocate(job)
            self.active_jobs.remove(job)

    def num_remaining_jobs(self) -> int:
        return len(self.pending_jobs) + len(self.active_jobs)

    def iterate(self) -> list[dict[str, Any]]:
        self.iterations += 1
        results: list[dict[str, Any]] = []
        self._start_jobs(results)
        for job in list(self.active_jobs):
            self._sample(job, results)
        return results

    # --- the page table -------------------------------------------------------------------------

    def _start_jobs(self, results: list[dict[str, Any]]) -> None:
        for job in list(self.pending_jobs):
            if len(self.active_jobs) >= self.max_batch_size:
                return
            needed = len([h for h in job.page_hashes if h not in self.referenced_pages])
            if needed + job.new_unique_pages > len(self.unreferenced_pages):
                continue
            self.pending_jobs.remove(job)
            self.active_jobs.append(job)
            self._allocate(job)
            result: dict[str, Any] = {
                "job": job,
                "stage": "started",
                "eos": False,
                "serial": job.serial_number,
            }
            if job.identifier is not None:
                result["identifier"] = job.identifier
            results.append(result)

    def _allocate(self, job: FakeDynamicJob) -> None:
        for phash in job.page_hashes:
            page = self.referenced_pages.get(phash) or self.unreferenced_pages.get(phash)
            if page is None:
                page = self._oldest_free_page(phash)
            self._add_ref(page)
            job.allocated_pages.append(page)
        for _ in range(job.new_unique_pages):
            page = self._oldest_free_page(object())
            self._add_ref(page)
            job.allocated_pages.append(page)
        for page in job.allocated_pages:  # pages already holding the prompt's start
            if page.kv_position != self.page_size:
                break
            job.cached_pages += 1
        for page in job.allocated_pages[: len(job.page_hashes)]:  # the prompt, ingested
            page.kv_position = self.page_size

    def _oldest_free_page(self, phash: object) -> FakePage:
        page = min(self.unreferenced_pages.values(), key=lambda p: p.access_serial)
        del self.unreferenced_pages[page.phash]
        page.phash, page.kv_position = phash, 0
        self.unreferenced_pages[phash] = page
        return page

    def _add_ref(self, page: FakePage) -> None:
        self.access_serial += 1
        page.access_serial = self.access_serial
        if page.ref_count == 0:
            del self.unreferenced_pages[page.phash]
            self.referenced_pages[page.phash] = page
        page.ref_count += 1

    def _deallocate(self, job: FakeDynamicJob) -> None:
        for page in job.allocated_pages:
            page.ref_count -= 1
            if page.ref_count == 0:
                del self.referenced_pages[page.phash]
                self.unreferenced_pages[page.phash] = page
        job.allocated_pages = []

    # --- sampling: the model replays the script, then EOS ---------------------------------------

    def _sample(self, job: FakeDynamicJob, results: list[dict[str, Any]]) -> None:
        tokens = [*self.script, EOS_ID]
        token = tokens[min(job.new_tokens, len(tokens) - 1)]
        job.new_tokens += 1
        result: dict[str, Any] = {
            "job": job,
            "stage": "streaming",
            "eos": False,
            "serial": job.serial_number,
        }
        if job.identifier is not None:
            result["identifier"] = job.identifier
        if token in job.stop_tokens:
            # A stop_token eos emits no text: what was held back, and the stop token's own
            # piece, go under "held".
            result.update(eos=True, eos_reason="stop_token", eos_triggering_token_id=token)
            if job.held + PIECES[token]:
                result["held"] = {"text": job.held + PIECES[token]}
        else:
            piece, job.held = job.held + PIECES[token], ""
            completion = job.completion
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
                piece, job.held = piece[: len(piece) - size], piece[len(piece) - size :]
            if piece:
                result["text"] = piece
            job.completion += piece
            self._add_probs(job, token, result)
        if result["eos"]:
            job.is_finished = True
            result.update(
                full_completion=job.completion,
                new_tokens=job.new_tokens,
                prompt_tokens=int(job.input_ids.shape[-1]),
                cached_pages=job.cached_pages,
                cached_tokens=job.cached_pages * self.page_size,
            )
            self._deallocate(job)
            self.active_jobs.remove(job)
        results.append(result)

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


class FakeModel:
    """The loaded ExLlamaV2 model; here the tokens it will generate."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.unloaded = False

    def unload(self) -> None:
        self.unloaded = True


class FakeCache:
    """ExLlamaV2Cache: `max_seq_len` tokens shared by every job, and its bytes per device."""

    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len

    def footprint(self) -> list[int]:
        return [self.max_seq_len * 1024]


class FakeDynamicGeneratorAsync:
    """ExLlamaV2DynamicGeneratorAsync, as the library writes it: the dynamic generator under
    `generator`, and one task that calls its `iterate()` while jobs remain and routes each
    result to its job's queue. Unlike the library, no step is taken while a result waits to
    be read (a GPU slower than its consumers), so the tests see each step."""

    def __init__(
        self,
        model: FakeModel,
        cache: FakeCache,
        tokenizer: FakeTokenizer,
        max_batch_size: int | None = None,
        paged: bool = True,
    ) -> None:
        self.generator = FakeDynamicGenerator(
            model.script, max_batch_size or 16, cache.max_seq_len, paged
        )
        self.jobs: dict[FakeDynamicJob, FakeDynamicJobAsync] = {}
        self.condition = asyncio.Condition()
        self.iteration_task = asyncio.create_task(self._run_iteration())
        self._notifying: set[asyncio.Task[None]] = set()
        # What the tests look at.
        self.made: list[FakeDynamicJob] = []
        self.cancelled: list[FakeDynamicJob] = []
        self.closed = False

    async def _run_iteration(self) -> None:
        try:
            while True:
                async with self.condition:
                    await self.condition.wait_for(
                        lambda: len(self.jobs) > 0 or self.iteration_task.cancelled()
                    )
                # The pacing the library does not have (its queues are the library's).
                while any(not job.queue.empty() for job in self.jobs.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0)
                results = self.generator.iterate()
                for result in results:
                    job = result["job"]
                    async_job = self.jobs[job]
                    await async_job.put_result(result)
                    if result["eos"]:
                        del self.jobs[job]
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            return
        except Exception as exc:
            for async_job in self.jobs.values():
                await async_job.put_result(exc)

    def enqueue(self, job: FakeDynamicJobAsync) -> None:
        assert job.job not in self.jobs
        self.jobs[job.job] = job
        self.generator.enqueue(job.job)
        self.made.append(job.job)
        task = asyncio.create_task(self._notify_condition())
        self._notifying.add(task)  # the library keeps no reference; a test should not lose it
        task.add_done_callback(self._notifying.discard)

    async def _notify_condition(self) -> None:
        async with self.condition:
            self.condition.notify_all()

    async def close(self) -> None:
        self.closed = True
        self.iteration_task.cancel()
        await self._notify_condition()
        with contextlib.suppress(asyncio.CancelledError):
            await self.iteration_task

    async def cancel(self, job: FakeDynamicJobAsync) -> None:
        assert job.job in self.jobs
        self.generator.cancel(job.job)
        del self.jobs[job.job]
        self.cancelled.append(job.job)


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
