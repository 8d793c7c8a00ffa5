"""GGUF models on the CPU with llama-cpp-python.

One worker thread per loaded model runs generations one at a time, driving llama.cpp's token
generator directly: each token is turned into text (UTF-8 safe, stop strings held back) and sent
to the event loop as it is produced; closing the stream stops generation before the next token.
Chat prompts use the GGUF's own chat template when it has one, else the configured
`chat_format` (llama-cpp-python's formats: gemma, chatml, llama-3...). Only the template's own
markup is tokenized as control tokens (runtime/engines/chat_tokens.py): message text that spells
`<end_of_turn>` stays text.
A JSON schema is checked against runtime/engines/schema_limits.py and compiled to a grammar on
a thread of its own before the job is queued, so a schema never stalls the worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from runtime.config import ModelConfig
from runtime.engines.base import (
    CHAT,
    COMPLETION,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    TokenLogprob,
    UnsupportedRequest,
    Usage,
    token_budget,
)
from runtime.engines.chat_tokens import chat_tokens, utf8
from runtime.engines.schema_limits import SchemaTooComplex, check_grammar, check_schema
from runtime.engines.text import TextAssembler
from runtime.engines.worker import Emit, ThreadWorker

MAX_TOP_LOGPROBS = 20


class LlamaCppEngine:
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        settings = dict(config.engine_settings)
        threads = int(settings.pop("n_threads", 0) or os.cpu_count() or 1)
        self._llama_args: dict[str, Any] = {
            "n_ctx": config.context_length,
            "n_threads": threads,
            "n_threads_batch": int(settings.pop("n_threads_batch", threads)),
            "n_batch": int(settings.pop("n_batch", 512)),
            "n_gpu_layers": int(settings.pop("n_gpu_layers", 0)),
            "verbose": bool(settings.pop("verbose", False)),
            **settings,
        }
        self._llm: Any = None
        self._worker: ThreadWorker[Chunk] | None = None
        self._format: Callable[..., Any] | None = None
        # Chats are formatted with a fallback the weights were not trained on: said once.
        self._warn_fallback_format = False
        # Held while a grammar is test-compiled (off the worker), so unload waits for it.
        self._grammar_lock = threading.Lock()
        self._tokens_generated = 0
        self._log = structlog.get_logger("tiffin.engines.llama_cpp")

    # --- lifecycle --------------------------------------------------------------------------

    async def load(self) -> None:
        self._llm = await asyncio.to_thread(self._create)
        self._format = self._chat_formatter()
        self._worker = ThreadWorker(f"llama-cpp:{self.config.id}")

    def _create(self) -> Any:
        from llama_cpp import Llama

        try:
            return Llama(model_path=str(self.path), **self._llama_args)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp could not load {self.path.name}: {exc}") from exc

    async def unload(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker.join(timeout=30)
        self._worker = None
        with self._grammar_lock:  # a grammar test-compiling now reads the vocabulary
            if self._llm is not None:
                self._llm.close()
            self._llm = None

    # --- the Engine protocol ------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self._llama_args["n_ctx"])

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(utf8(text, "input"), add_bos=False, special=False))

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        raise EngineError(f"{self.config.id} is a text generation model; it has no embeddings")

    def stats(self) -> dict[str, Any]:
        worker = self._worker
        return {
            "engine": "llama_cpp",
            "context_length": self.context_length,
            "n_threads": self._llama_args["n_threads"],
            "queued": worker.queued if worker else 0,
            "busy": worker.busy if worker else False,
            "tokens_generated": self._tokens_generated,
        }

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._worker is None:
            raise EngineError(f"{self.config.id} is not loaded")
        prompt, stop = self._prompt(request)
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
            # Off the worker and the event loop: requests behind this one keep being served
            # while it compiles, and a client gone meanwhile never reaches the queue.
            grammar = await asyncio.to_thread(self._grammar, request.json_schema)
        if self._worker is None:  # unloaded meanwhile
            raise EngineError(f"{self.config.id} is not loaded")

        def job(emit: Emit, cancelled: threading.Event) -> None:
            self._run(request, prompt, stops, budget, grammar, emit, cancelled)

        stream = self._worker.stream(job)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # cancels the job

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

    def _grammar(self, schema: dict[str, Any] | None) -> Any:
        """The grammar for a JSON schema (or any JSON when None), built and test-compiled here,
        on a thread of the default executor: bounded work, once the schema passed its limits."""
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

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
        return LlamaGrammar.from_string(source, verbose=False)

    def _check_compiles(self, source: str) -> None:
        """llama.cpp refuses some grammars by handing back no sampler, and llama-cpp-python
        would add that null to its chain and crash at the first token: try it here first."""
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

    # --- generation (worker thread) --------------------------------------------------------------

    def _run(
        self,
        request: GenerationRequest,
        prompt: list[int],
        stops: tuple[list[str], set[int]],
        budget: int,
        grammar: Any,
        emit: Emit,
        cancelled: threading.Event,
    ) -> None:
        import llama_cpp

        llm = self._llm
        vocab = llm._model.vocab
        stop, stop_ids = stops
        completion_total = 0
        for index in range(request.n):
            if request.seed is not None or request.temperature <= 0:
                # A reproducible run (greedy or seeded) evaluates the whole prompt: logits from a
                # reused cache prefix are computed in other batch shapes and differ in the last
                # bits, which flips near-ties, so the answer would depend on earlier requests.
                llm.reset()
            llm.set_seed(
                # A sampling seed, not a secret: `random` is right here.
                request.seed + index if request.seed is not None else random.getrandbits(31)  # nosec B311
            )
            text = TextAssembler(stop)
            pending: list[TokenLogprob] = []
            produced, finish = 0, "length"
            tokens = llm.generate(
                prompt,
                temp=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                min_p=request.min_p,
                repeat_penalty=request.repeat_penalty,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                grammar=grammar,
            )
            try:
                for token in tokens:
                    if cancelled.is_set():
                        return
                    if token in stop_ids or llama_cpp.llama_vocab_is_eog(vocab, token):
                        finish = "stop"
                        break
                    produced += 1
                    if request.logprobs is not None:
                        pending.append(self._logprob(token, request.logprobs))
                    piece = text.feed(llm.detokenize([token]))
                    if piece or text.stopped:
                        emit(Chunk(index=index, text=piece, logprobs=pending))
                        pending = []
                    if text.stopped:
                        finish = "stop"
                        break
                    if produced >= budget:
                        break
            finally:
                tokens.close()
                self._tokens_generated += produced  # cancelled runs count too (see stats)
            completion_total += produced
            last = index == request.n - 1
            emit(
                Chunk(
                    index=index,
                    text=text.flush(),
                    logprobs=pending,
                    finish_reason=finish,
                    usage=Usage(len(prompt), completion_total) if last else None,
                )
            )

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        llm = self._llm
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        piece = llm.detokenize([token])
        alternatives: list[tuple[str, float]] = []
        if top:
            best = np.argpartition(-logprobs, top)[:top]
            best = best[np.argsort(-logprobs[best])]
            alternatives = [
                (llm.detokenize([int(t)]).decode("utf-8", "replace"), float(logprobs[t]))
                for t in best
            ]
        return TokenLogprob(
            token=piece.decode("utf-8", "replace"),
            logprob=float(logprobs[token]),
            bytes=list(piece),
            top=alternatives,
        )
