"""EXL2/GPTQ (and FP16) Hugging Face checkpoints on CUDA with ExLlamaV2's dynamic generator:
a paged cache shared by every request, continuous batching (each request is one job, at most
`engine_settings.parallel` decoded together), streaming, and `job.cancel()` when the client
goes away.

exllamav2 is imported only when a model is loaded, so CPU installs never need it. The request
mapping (`sampler_fields`, `job_fields`, `finish_reason`, `logprobs_of`) is plain code, tested on
any machine; the rest runs where CUDA is.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from runtime.config_schema import ModelConfig
from runtime.engines.chat_tokens import refuse_control_text
from runtime.engines.engine import parallel_setting, token_budget
from runtime.engines.text import render_chat
from runtime.types import (
    CHAT,
    COMPLETION,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    TokenLogprob,
    UnsupportedRequest,
    Usage,
)

PAGE = 256  # the dynamic generator allocates its cache in pages of this many tokens
# Jobs decoded together: the generator's max_batch_size, 16 here since this engine was written
# (the setting was called max_batch_size). The cache bounds it too: a job holds pages for its
# prompt plus its max_tokens from its first step, so a request without max_tokens holds a
# whole context, and cache_size must be parallel x context_length for that many to run at once.
DEFAULT_PARALLEL = 16
FINISH = {
    "stop_token": "stop",
    "stop_string": "stop",
    "end_filter": "stop",
    "max_new_tokens": "length",
}


def sampler_fields(request: GenerationRequest) -> dict[str, Any]:
    """ExLlamaV2Sampler.Settings fields for an OpenAI request. Every field is set, because the
    library's defaults are not neutral (repetition penalty 1.025, top_k 50, top_p 0.8)."""
    if request.temperature <= 0:
        return {
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 0.0,
            "min_p": 0.0,
            "token_repetition_penalty": request.repeat_penalty,
            "token_presence_penalty": request.presence_penalty,
            "token_frequency_penalty": request.frequency_penalty,
        }
    return {
        "temperature": request.temperature,
        "top_k": request.top_k,  # 0 disables
        "top_p": request.top_p if request.top_p < 1.0 else 0.0,  # 0 disables
        "min_p": request.min_p,
        "token_repetition_penalty": request.repeat_penalty,
        "token_presence_penalty": request.presence_penalty,
        "token_frequency_penalty": request.frequency_penalty,
    }


def job_fields(
    request: GenerationRequest, max_new_tokens: int, eos_ids: Sequence[int], index: int = 0
) -> dict[str, Any]:
    """Keyword arguments of ExLlamaV2DynamicJob(Async) besides input_ids and gen_settings.
    EOS is not a stop condition unless given, so the model's EOS ids are added."""
    # A sampling seed, not a secret: `random` is right here.
    seed = request.seed + index if request.seed is not None else random.getrandbits(31)  # nosec B311
    fields: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "stop_conditions": [*request.stop, *eos_ids],
        "seed": seed,
        "identifier": (request.request_id, index),
        "decode_special_tokens": False,
    }
    if request.logprobs is not None:
        fields["return_probs"] = True
        fields["return_top_tokens"] = request.logprobs
    return fields


def chat_template_of(path: Path, tokenizer_config: dict[str, Any] | None) -> str | None:
    """The checkpoint's chat template. transformers has saved it to `chat_template.jinja` since
    4.43, and exllamav2 reads only tokenizer_config.json, so both places are looked at; a list
    of named templates (the older multi-template form) yields its `default` one."""
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    jinja = path / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def finish_reason(result: dict[str, Any]) -> str:
    return FINISH.get(str(result.get("eos_reason", "")), "stop")


def stop_string(result: dict[str, Any]) -> str | None:
    """The stop string that ended the job, when one did."""
    if result.get("eos_reason") != "stop_string":
        return None
    matched = result.get("eos_triggering_string")
    return matched if isinstance(matched, str) else None


def held_text(result: dict[str, Any], plain_pieces: Sequence[str]) -> str:
    """Text the library was still holding back (a possible start of a stop string, or half a
    character) when a stop token ended the job. It is not in `text` then but in
    `held["text"]`, followed by the stop token's own piece, which is not output."""
    if result.get("eos_reason") != "stop_token":
        return ""  # every other eos emits the held text, and a stop string's rest is not output
    held = str((result.get("held") or {}).get("text", ""))
    token = result.get("eos_triggering_token_id")
    piece = plain_pieces[token] if isinstance(token, int) and 0 <= token < len(plain_pieces) else ""
    return held[: -len(piece)] if piece and held.endswith(piece) else held


def logprobs_of(result: dict[str, Any], pieces: Sequence[str]) -> list[TokenLogprob]:
    """Per-token logprobs from a streaming result with return_probs/return_top_tokens."""
    if "token_ids" not in result or "token_probs" not in result:
        return []
    ids = result["token_ids"][0].tolist()
    probs = result["token_probs"][0].tolist()
    tops = result.get("top_k_tokens")
    top_probs = result.get("top_k_probs")
    items = []
    for position, (token, prob) in enumerate(zip(ids, probs, strict=False)):
        top: list[tuple[str, float]] = []
        if tops is not None and top_probs is not None:
            top = [
                (pieces[int(t)], math.log(max(float(p), 1e-45)))
                for t, p in zip(
                    tops[0][position].tolist(), top_probs[0][position].tolist(), strict=False
                )
            ]
        items.append(
            TokenLogprob(token=pieces[int(token)], logprob=math.log(max(prob, 1e-45)), top=top)
        )
    return items


def paged_attention(setting: bool | None, available: bool) -> bool:
    """Whether the generator pages its cache: `setting` None (auto) follows whether flash-attn
    with paged attention is installed; True without it is a clear error, not exllamav2's assert."""
    if setting is None:
        return available
    if setting and not available:
        raise EngineError(
            "engine_settings.paged is true, but paged attention needs flash-attn >= 2.5.7, "
            "which is not installed; set paged to auto or false to serve one job at a time"
        )
    return setting


class ExLlamaV2Engine:
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        settings = config.engine_settings
        self.cache_tokens = _round_up(int(settings.get("cache_size", config.context_length)), PAGE)
        self.cache_type = str(settings.get("cache_type", "fp16"))
        self.gpu_split: list[float] | None = settings.get("gpu_split")
        # `max_batch_size`, this setting's name before issue 15, still counts without `parallel`.
        legacy = "max_batch_size" in settings and "parallel" not in settings
        name = "max_batch_size" if legacy else "parallel"
        self.parallel = parallel_setting(settings, DEFAULT_PARALLEL, name=name)
        # "auto" (the default): paged when flash-attn >= 2.5.7 is importable, else the library's
        # unpaged mode, which runs one job at a time. True insists on paged attention.
        paged = settings.get("paged", "auto")
        self.paged: bool | None = None if paged == "auto" else bool(paged)
        self._model: Any = None
        self._cache: Any = None
        self._tokenizer: Any = None
        self._generator: Any = None
        self._pieces: list[str] = []
        self._plain_pieces: list[str] = []  # as the generator decodes output text
        self._eos_ids: list[int] = []
        self._template: str | None = None
        # The model's max_seq_len once loaded. The cache (cache_size) may be larger, to hold
        # several requests at once, but one sequence may not outgrow the model's positions.
        self._context_length = config.context_length
        self.active_jobs = 0
        # Cumulative, from every generator step (see _count_step).
        self._steps = 0
        self._sequences_per_step: Counter[str] = Counter()
        self._prompt_cache_hit_tokens = 0
        self._prompt_tokens_evaluated = 0

    async def load(self) -> None:
        await asyncio.to_thread(self._load_weights)
        self._start_generator()

    def _start_generator(self) -> None:
        """The dynamic generator over the loaded model and cache. Its async wrapper starts its
        own task, so it is made on the event loop. Unpaged, the library runs one job at a time."""
        from exllamav2.generator import ExLlamaV2DynamicGeneratorAsync

        generator = ExLlamaV2DynamicGeneratorAsync(
            model=self._model,
            cache=self._cache,
            tokenizer=self._tokenizer,
            max_batch_size=self.parallel if self.paged else 1,
            paged=bool(self.paged),
        )
        # The wrapper's task calls `generator.generator.iterate()` once a step, and the library
        # has no hook for a step: the bound method is wrapped on this instance to count them.
        iterate = generator.generator.iterate

        def counted_iterate() -> list[dict[str, Any]]:
            results: list[dict[str, Any]] = iterate()
            self._count_step(results)
            return results

        generator.generator.iterate = counted_iterate
        self._generator = generator

    def _count_step(self, results: list[dict[str, Any]]) -> None:
        """Step counters from one `iterate()`'s results. Every job decoded in a step returns one
        "streaming" result; a step with no results did nothing (the wrapper's task spins so
        while jobs wait for cache pages) and is not counted. A step that only ingests a long
        prompt, chunk by chunk, counts under "0"."""
        if not results:
            return
        decoded = {result["job"] for result in results if result.get("stage") == "streaming"}
        self._steps += 1
        self._sequences_per_step[str(len(decoded))] += 1
        for result in results:
            if result.get("eos"):
                # A finished job's result says how long its prompt was and how much of it
                # was already in the cache (whole pages another job had filled).
                prompt = int(result.get("prompt_tokens", 0))
                cached = min(int(result.get("cached_tokens", 0)), prompt)
                self._prompt_cache_hit_tokens += cached
                self._prompt_tokens_evaluated += prompt - cached

    def _load_weights(self) -> None:
        try:
            import exllamav2
        except ImportError as exc:
            raise EngineError(
                "exllamav2 is not installed; install the gpu extra "
                "(pip install 'tiffin[gpu]') on a machine with CUDA"
            ) from exc
        from exllamav2.attn import has_flash_attn_with_paged

        self.paged = paged_attention(self.paged, bool(has_flash_attn_with_paged))
        config = exllamav2.ExLlamaV2Config(str(self.path))
        config.arch_compat_overrides()
        config.max_seq_len = (
            min(self.config.context_length, config.max_seq_len) or config.max_seq_len
        )
        model = exllamav2.ExLlamaV2(config)
        caches = {
            "fp16": exllamav2.ExLlamaV2Cache,
            "q4": exllamav2.ExLlamaV2Cache_Q4,
            "q6": exllamav2.ExLlamaV2Cache_Q6,
            "q8": exllamav2.ExLlamaV2Cache_Q8,
        }
        if self.cache_type not in caches:
            raise EngineError(
                f"cache_type {self.cache_type!r}: expected one of {', '.join(caches)}"
            )
        if self.gpu_split:
            model.load(gpu_split=list(self.gpu_split))
            cache = caches[self.cache_type](model, max_seq_len=self.cache_tokens)
        else:
            cache = caches[self.cache_type](model, max_seq_len=self.cache_tokens, lazy=True)
            model.load_autosplit(cache)
        tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
        self._model, self._cache, self._tokenizer = model, cache, tokenizer
        self._pieces = tokenizer.get_id_to_piece_list(True)
        self._plain_pieces = tokenizer.get_id_to_piece_list(False)
        eos = (getattr(config, "generation_config", None) or {}).get("eos_token_id") or []
        self._eos_ids = sorted({tokenizer.eos_token_id, *_as_list(eos)} - {None})
        self._template = chat_template_of(self.path, tokenizer.tokenizer_config_dict)
        self._context_length = int(config.max_seq_len)

    async def unload(self) -> None:
        if self._generator is not None:
            await self._generator.close()
        if self._model is not None:
            self._model.unload()
        self._generator = self._model = self._cache = self._tokenizer = None
        import gc

        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except ImportError:
            pass

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text)[0].tolist())

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        raise EngineError(f"{self.config.id} is a text generation model; it has no embeddings")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "engine": "exllamav2",
            "cache_tokens": self.cache_tokens,
            "cache_type": self.cache_type,
            "context_length": self.context_limit,
            "active_jobs": self.active_jobs,
            **self._batch_stats(),
        }
        try:
            import torch

            if torch.cuda.is_available():
                stats["gpu_memory_bytes"] = {
                    str(i): torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())
                }
        except ImportError:
            pass
        if self._cache is not None:
            stats["cache_bytes"] = sum(self._cache.footprint())
        return stats

    def _batch_stats(self) -> dict[str, Any]:
        """The keys every batching engine reports, read from the dynamic generator's own queue
        and page table. Each job here is one sequence (no CFG), so jobs count sequences."""
        core = self._generator.generator if self._generator is not None else None
        if core is None:
            parallel, running, waiting = self.parallel, 0, 0
            page_size, pages, pages_used = PAGE, self.cache_tokens // PAGE, 0
        else:
            # max_batch_size, not `parallel`: unpaged, the generator runs one job at a time.
            parallel = int(core.max_batch_size)
            running, waiting = len(core.active_jobs), len(core.pending_jobs)
            # Unpaged, the whole cache is one page.
            page_size, pages = int(core.page_size), int(core.max_pages)
            pages_used = len(core.referenced_pages)
        return {
            "parallel": parallel,
            "slots_busy": running,
            # Slots may be free while jobs wait: a job starts only when the cache also has
            # free pages for its prompt plus its max_tokens.
            "slots_free": max(parallel - running, 0),
            "running": running,
            "waiting": waiting,
            # Pages held by running jobs, whole: a job holds its pages from its first step.
            # Pages no job holds keep their keys and values for a later prompt that starts
            # the same way, but are free for any job: they are not counted.
            "kv_cells_used": pages_used * page_size,
            "kv_cells_total": pages * page_size,
            # From finished jobs only: the library reports a job's prompt and cached tokens in
            # its eos result, so a cancelled job's prompt is not counted.
            "prompt_cache_hit_tokens": self._prompt_cache_hit_tokens,
            "prompt_tokens_evaluated": self._prompt_tokens_evaluated,
            "steps": self._steps,
            "sequences_per_step": dict(self._sequences_per_step),
        }

    @property
    def context_limit(self) -> int:
        """Prompt plus completion tokens one request may use."""
        return min(self._context_length, self.cache_tokens)

    def _tokenize_text(self, text: str, special: bool) -> list[int]:
        return list(self._tokenizer.encode(text, encode_special_tokens=special)[0].tolist())

    def prompt_ids(self, request: GenerationRequest) -> Any:
        if request.messages is not None:
            refuse_control_text(request.messages, self._tokenize_text)
            try:
                text = render_chat(
                    self._template,
                    request.messages,
                    bos_token=self._tokenizer.bos_token or "",
                    eos_token=self._tokenizer.eos_token or "",
                )
            except Exception as exc:
                raise UnsupportedRequest(
                    f"messages cannot be formatted: {exc}", "messages"
                ) from None
            return self._tokenizer.encode(text, encode_special_tokens=True)
        return self._tokenizer.encode(request.prompt or "", add_bos=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._generator is None:
            raise EngineError(f"{self.config.id} is not loaded")
        if request.json_mode or request.json_schema is not None:
            raise UnsupportedRequest(
                "response_format json is not supported by the exllamav2 engine",
                param="response_format",
            )
        from exllamav2.generator import ExLlamaV2DynamicJobAsync, ExLlamaV2Sampler

        ids = self.prompt_ids(request)
        prompt_tokens = int(ids.shape[-1])
        # Checked here: a job the generator rejects at enqueue time wedges its queue, and one
        # longer than the model's max_seq_len runs past its position embeddings.
        budget = token_budget(request, prompt_tokens, self.context_limit)
        settings = ExLlamaV2Sampler.Settings(**sampler_fields(request))
        completion_total = 0
        for index in range(request.n):
            job = ExLlamaV2DynamicJobAsync(
                self._generator,
                input_ids=ids,
                gen_settings=settings,
                **job_fields(request, budget, self._eos_ids, index),
            )
            self.active_jobs += 1
            finished = False
            try:
                async for result in job:
                    text = result.get("text", "")
                    logprobs = (
                        logprobs_of(result, self._pieces) if request.logprobs is not None else []
                    )
                    if result.get("eos"):
                        text += held_text(result, self._plain_pieces)
                        finished = True
                        completion_total += int(result.get("new_tokens", 0))
                        last = index == request.n - 1
                        yield Chunk(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=finish_reason(result),
                            stop_sequence=stop_string(result),
                            usage=Usage(prompt_tokens, completion_total) if last else None,
                        )
                    elif text or logprobs:
                        yield Chunk(index=index, text=text, logprobs=logprobs)
            finally:
                self.active_jobs -= 1
                if not finished and not job.job.is_finished:
                    await job.cancel()


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _as_list(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
