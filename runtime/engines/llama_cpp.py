"""GGUF models on the CPU with llama-cpp-python, many requests at once.

The model's context belongs to a BatchScheduler (runtime/engines/llama_scheduler.py): one thread
that decodes every active sequence in the same `llama_decode` step, with llama.cpp's native
sampler chains (runtime/engines/llama_sampling.py), a prompt cache per slot and chunked prefill,
on a thread pool made once for the context (runtime/engines/llama_threadpool.py).
This module prepares requests on the event loop: the prompt's tokens, the token budget, stop
strings, the grammar for a JSON schema. Chat prompts use the GGUF's own chat template when it
has one, else the configured `chat_format` (llama-cpp-python's formats: gemma, chatml,
llama-3...). Only the template's own markup is tokenized as control tokens
(runtime/engines/chat_tokens.py): message text that spells `<end_of_turn>` stays text.
A JSON schema is checked against runtime/engines/schema_limits.py and compiled to a grammar on
a thread of its own before the job is queued, so a schema never stalls the scheduler.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from runtime.config_schema import ModelConfig
from runtime.engines.chat_tokens import chat_tokens, utf8
from runtime.engines.engine import token_budget
from runtime.engines.llama_scheduler import BatchScheduler, Job
from runtime.engines.llama_settings import llama_settings
from runtime.engines.llama_threadpool import ThreadPool
from runtime.engines.schema_limits import SchemaTooComplex, check_grammar, check_schema
from runtime.tool_syntax import detect_format
from runtime.types import (
    CHAT,
    COMPLETION,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    UnsupportedRequest,
    close,
)

MAX_TOP_LOGPROBS = 20
# The high-level `Llama` object is kept for the vocabulary, tokenizer and chat template; its own
# context is never decoded with, so it is made as small as llama.cpp allows.
_UNUSED_CONTEXT = 256


class LlamaCppEngine:
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        self.settings = llama_settings(config, f"models.{config.id}.engine_settings")
        self.parallel = self.settings.parallel
        self._llm: Any = None
        self._context: Any = None
        self._pool: ThreadPool | None = None
        self._scheduler: BatchScheduler | None = None
        self._format: Callable[..., Any] | None = None
        # The tool-call syntax the chat template teaches (runtime/tool_syntax.py), once loaded.
        self.tool_syntax: str | None = None
        # Chats are formatted with a fallback the weights were not trained on: said once.
        self._warn_fallback_format = False
        # Held while a grammar is test-compiled (off the scheduler), so unload waits for it.
        self._grammar_lock = threading.Lock()
        self._log = structlog.get_logger("tiffin.engines.llama_cpp")

    # --- lifecycle --------------------------------------------------------------------------

    async def load(self) -> None:
        import llama_cpp

        self._llm, self._context = await asyncio.to_thread(self._create)
        settings = self.settings
        threads = max(settings.n_threads, settings.n_threads_batch)
        try:
            self._pool = ThreadPool(self._context, threads, settings.poll)
        except (OSError, AttributeError, RuntimeError) as exc:  # a build without those symbols
            self._log.warning(
                "no ggml thread pool: llama.cpp starts its threads at every step",
                model=self.config.id,
                reason=str(exc)[:200],
            )
        self._format = self._chat_formatter()
        llm = self._llm
        self._scheduler = BatchScheduler(
            f"llama-cpp:{self.config.id}",
            self._context,
            llm._model.vocab,
            lambda token: bytes(llm.detokenize([token])),
            parallel=settings.parallel,
            slot_context=settings.slot_context,
            batch_tokens=settings.batch_tokens,
            prompt_cache=settings.prompt_cache,
            window=0 if settings.swa_full else int(llama_cpp.llama_model_n_swa(llm._model.model)),
            adaptive_threads=settings.n_threads if settings.adaptive_threads else 0,
        )

    def _create(self) -> tuple[Any, Any]:
        import llama_cpp
        from llama_cpp import Llama

        settings = self.settings
        args: dict[str, Any] = {"n_gpu_layers": 0, "verbose": False, **settings.llama_args}
        try:
            llm = Llama(
                model_path=str(self.path),
                n_ctx=_UNUSED_CONTEXT,
                n_batch=_UNUSED_CONTEXT,
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads_batch,
                **args,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {self.path.name}: {exc}") from exc
        params = llm.context_params  # the user's llama.cpp settings (flash_attn, type_k...)
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.batch_tokens
        params.n_ubatch = min(settings.batch_tokens, 512)
        params.n_seq_max = settings.parallel
        params.kv_unified = True
        params.swa_full = settings.swa_full
        if "flash_attn" not in settings.llama_args:
            # llama.cpp's own default (auto: on where the backend has it); llama-cpp-python's
            # `Llama` turns it off unless asked.
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.n_threads = settings.n_threads
        params.n_threads_batch = settings.n_threads_batch
        context = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not context:
            llm.close()
            raise EngineError(
                f"llama.cpp could not make a context of {settings.n_ctx} cells for"
                f" {settings.parallel} sequences of {self.path.name}"
            )
        return llm, context

    async def unload(self) -> None:
        import llama_cpp

        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        self._scheduler = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        with self._grammar_lock:  # a grammar test-compiling now reads the vocabulary
            if self._context is not None:
                llama_cpp.llama_free(self._context)
            self._context = None
            if self._llm is not None:
                self._llm.close()
            self._llm = None

    # --- the Engine protocol ------------------------------------------------------------------

    @property
    def scheduler(self) -> BatchScheduler | None:
        """The loaded model's scheduler (None when unloaded)."""
        return self._scheduler

    @property
    def context_length(self) -> int:
        """A request's context: one slot's share of the KV cache."""
        return self.settings.slot_context

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(utf8(text, "input"), add_bos=False, special=False))

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        raise EngineError(f"{self.config.id} is a text generation model; it has no embeddings")

    def stats(self) -> dict[str, Any]:
        scheduler = self._scheduler
        batching = scheduler.stats() if scheduler else {}
        chooser = scheduler.threads if scheduler else None
        return {
            "engine": "llama_cpp",
            "context_length": self.context_length,
            "n_threads": chooser.current
            if chooser and chooser.current
            else self.settings.n_threads,
            "n_threads_adaptive": chooser is not None,
            "thread_switches": chooser.switches if chooser else 0,
            "cpu_busy_elsewhere": round(chooser.others, 2) if chooser else None,
            "batch_tokens": self.settings.batch_tokens,
            **batching,
            "queued": batching.get("waiting", 0),
            "busy": bool(batching.get("slots_busy", 0)),
            "tokens_generated": batching.get("tokens_generated", 0),
        }

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._scheduler is None:
            raise EngineError(f"{self.config.id} is not loaded")
        if request.n > self.parallel:
            raise UnsupportedRequest(
                f"n is {request.n}, but {self.config.id} decodes at most {self.parallel}"
                " sequences at once (engine_settings.parallel)",
                param="n",
            )
        prompt, stop = self._prompt(request)
        if not prompt:  # a model without BOS and an empty prompt: nothing to decode from
            field = "messages" if request.messages is not None else "prompt"
            raise UnsupportedRequest(f"{field} is empty: there is nothing to continue", field)
        budget = token_budget(request, len(prompt), self.context_length)
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise UnsupportedRequest(
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
            )
        if request.json_schema is not None:
            check_schema(request.json_schema)
        stop_ids = self._stop_tokens(stop)
        return self._stream(request, prompt, (stop, stop_ids), budget)

    async def _stream(
        self,
        request: GenerationRequest,
        prompt: list[int],
        stops: tuple[list[str], set[int]],
        budget: int,
    ) -> AsyncIterator[Chunk]:
        grammar = None
        if request.json_schema is not None or request.json_mode:
            # Off the scheduler and the event loop: requests behind this one keep being served
            # while it compiles, and a client gone meanwhile never reaches the queue.
            grammar = await asyncio.to_thread(self._grammar, request.json_schema)
        scheduler = self._scheduler
        if scheduler is None:  # unloaded meanwhile
            raise EngineError(f"{self.config.id} is not loaded")
        stop, stop_ids = stops
        job = Job(request, prompt, budget, stop, stop_ids, grammar, asyncio.get_running_loop())
        stream = scheduler.stream(job)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await close(stream)  # cancels the job

    # --- preparing a request (event loop) ----------------------------------------------------

    def _prompt(self, request: GenerationRequest) -> tuple[list[int], list[str]]:
        stop = list(request.stop)
        if request.messages is not None:
            self._warn_once_about_the_format()
            tokens, extra = chat_tokens(self._llm, self._render, request.messages, request.tools)
            stop += extra
        else:
            text = utf8(request.prompt or "", "prompt")
            tokens = list(self._llm.tokenize(text, add_bos=True, special=False))
        return tokens, [s for s in stop if s]

    def _render(self, messages: list[dict[str, Any]], tools: Any) -> Any:
        assert self._format is not None
        try:
            return self._format(messages=messages, tools=tools)
        except Exception as exc:  # a template's raise_exception, bad roles...
            raise UnsupportedRequest(f"messages cannot be formatted: {exc}", "messages") from None

    def _warn_once_about_the_format(self) -> None:
        if not self._warn_fallback_format:
            return
        self._warn_fallback_format = False
        self._log.warning(
            "chat prompts use a fallback format",
            model=self.config.id,
            format="chatml",
            reason="the GGUF has no chat template and the model sets no chat_format",
            fix=(
                "set chat_format for this model (integrations.custom_models.settings.models"
                "[].chat_format: gemma, chatml, llama-3, mistral-instruct...) or serve an"
                " instruction-tuned GGUF that carries its chat template"
            ),
        )

    def _stop_tokens(self, stop: list[str]) -> set[int]:
        """Stop strings that are single special tokens (`<end_of_turn>`) never appear in the
        detokenized text, so they are matched by id."""
        ids = set()
        for text in stop:
            tokens = self._llm.tokenize(utf8(text.strip(), "stop"), add_bos=False, special=True)
            if len(tokens) == 1 and not self._llm.detokenize(tokens):
                ids.add(tokens[0])
        return ids

    def _grammar(self, schema: dict[str, Any] | None) -> str:
        """The GBNF grammar for a JSON schema (or any JSON when None), built and test-compiled
        here, on a thread of the default executor: bounded work, once the schema passed its
        limits."""
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

        source = JSON_GBNF
        if schema is not None:
            try:
                source = json_schema_to_gbnf(json.dumps(schema))
            except Exception as exc:  # the converter asserts and raises on what it lacks
                detail = str(exc)[:200]
                raise UnsupportedRequest(
                    f"response_format.json_schema is not supported: {detail}", "response_format"
                ) from None
            check_grammar(source)
        self._check_compiles(source)
        return source

    def _check_compiles(self, source: str) -> None:
        """llama.cpp refuses some grammars by handing back no sampler: try it here, where the
        refusal is a 400, not on the scheduler."""
        import llama_cpp

        with self._grammar_lock:
            if self._llm is None:
                raise EngineError(f"{self.config.id} is not loaded")
            sampler = llama_cpp.llama_sampler_init_grammar(
                self._llm._model.vocab, source.encode(), b"root"
            )
            if not sampler:
                raise SchemaTooComplex(
                    "llama.cpp refused the grammar built from the schema (it nests or repeats"
                    " more than llama.cpp allows): lower maxLength/maxItems or pattern counts"
                )
            llama_cpp.llama_sampler_free(sampler)

    def _chat_formatter(self) -> Callable[..., Any]:
        from llama_cpp import llama_chat_format

        llm = self._llm
        template = llm.metadata.get("tokenizer.chat_template")
        self.tool_syntax = detect_format(template)
        if template:  # the weights' own format wins; chat_format is the fallback
            eos, bos = llm.token_eos(), llm.token_bos()
            return llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        name = self.config.chat_format or "chatml"
        self._warn_fallback_format = self.config.chat_format is None
        for candidate in (name.replace("-", "_"), name.replace("-", "")):
            formatter = getattr(llama_chat_format, f"format_{candidate}", None)
            if callable(formatter):
                return formatter  # type: ignore[no-any-return]
        raise EngineError(f"unknown chat_format {name!r} for {self.config.id}")
