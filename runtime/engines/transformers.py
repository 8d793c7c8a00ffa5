"""Hugging Face checkpoints (config.json plus .safetensors/.bin, or .pt/.pth state dicts) with
transformers, on CPU or CUDA.

Generation runs on one worker thread per model through `model.generate` with a streamer that
hands each new token to us; text is decoded incrementally (so multi-token characters and
SentencePiece spaces come out right) and stop strings are held back. Closing the stream sets a
flag that a stopping criterion checks before the next token.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from runtime.config_schema import ModelConfig
from runtime.engines.chat_tokens import refuse_control_text
from runtime.engines.engine import token_budget
from runtime.engines.text import CHATML_TEMPLATE, TextAssembler
from runtime.engines.worker import Emit, ThreadWorker
from runtime.types import (
    CHAT,
    COMPLETION,
    Chunk,
    Embeddings,
    EngineError,
    GenerationRequest,
    UnsupportedRequest,
    Usage,
)


class TransformersEngine:
    capabilities = frozenset({CHAT, COMPLETION})

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config
        settings = config.engine_settings
        self.device_setting = str(settings.get("device", "auto"))
        self.dtype_setting = str(settings.get("dtype", "auto"))
        self._model: Any = None
        self._tokenizer: Any = None
        self._worker: ThreadWorker[Chunk] | None = None
        self.device = "cpu"
        self._context_length = config.context_length

    async def load(self) -> None:
        await asyncio.to_thread(self._load)
        self._worker = ThreadWorker(f"transformers:{self.config.id}")

    def _load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.device = self.device_setting
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype: Any = "auto" if self.dtype_setting == "auto" else getattr(torch, self.dtype_setting)
        try:
            # Every from_pretrained here reads a local folder (local_files_only): no Hub
            # download, so there is no revision to pin (bandit B615).
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)  # nosec B615
            state_dicts = sorted([*self.path.glob("*.pt"), *self.path.glob("*.pth")])
            standard = [*self.path.glob("*.safetensors"), *self.path.glob("*.bin")]
            if state_dicts and not standard:
                hf_config = AutoConfig.from_pretrained(self.path, local_files_only=True)  # nosec B615
                model = AutoModelForCausalLM.from_config(hf_config)  # type: ignore[no-untyped-call]
                state = torch.load(state_dicts[0], map_location="cpu", weights_only=True)
                model.load_state_dict(
                    state.get("state_dict", state) if isinstance(state, dict) else state
                )
                if dtype != "auto":
                    model = model.to(dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(  # nosec B615
                    self.path, local_files_only=True, dtype=dtype
                )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise EngineError(f"transformers could not load {self.path.name}: {exc}") from exc
        self._model = model.to(self.device).eval()
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit:
            self._context_length = min(self.config.context_length, int(limit))

    async def unload(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker.join(timeout=30)
        self._worker = None
        self._model = None
        self._tokenizer = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        raise EngineError(f"{self.config.id} is a text generation model; it has no embeddings")

    def stats(self) -> dict[str, Any]:
        worker = self._worker
        stats: dict[str, Any] = {
            "engine": "transformers",
            "device": self.device,
            "context_length": self._context_length,
            "queued": worker.queued if worker else 0,
        }
        if self._model is not None:
            stats["dtype"] = str(self._model.dtype)
            stats["parameters"] = sum(p.numel() for p in self._model.parameters())
        return stats

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self._worker is None:
            raise EngineError(f"{self.config.id} is not loaded")
        if request.json_mode or request.json_schema is not None:
            raise UnsupportedRequest(
                "response_format json is not supported by the transformers "
                "engine; serve the model as GGUF for grammar-constrained "
                "output",
                param="response_format",
            )
        if request.logprobs is not None:
            raise UnsupportedRequest(
                "logprobs are not supported by the transformers engine", param="logprobs"
            )
        if request.presence_penalty or request.frequency_penalty:
            raise UnsupportedRequest(
                "presence/frequency penalties are not supported by the "
                "transformers engine; use repeat_penalty",
                param="presence_penalty",
            )
        prompt = self._prompt(request)
        budget = token_budget(request, len(prompt), self._context_length)

        def job(emit: Emit, cancelled: threading.Event) -> None:
            self._run(request, prompt, budget, emit, cancelled)

        return self._worker.stream(job)

    def _prompt(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is None:
            return list(tokenizer(request.prompt or "")["input_ids"])
        template = None if tokenizer.chat_template else CHATML_TEMPLATE
        refuse_control_text(request.messages, self._tokenize_text)
        try:
            ids = tokenizer.apply_chat_template(
                request.messages,
                add_generation_prompt=True,
                tokenize=True,
                chat_template=template,
                return_dict=False,
            )
        except Exception as exc:
            raise UnsupportedRequest(f"messages cannot be formatted: {exc}", "messages") from None
        return list(ids)

    def _tokenize_text(self, text: str, special: bool) -> list[int]:
        encoded = self._tokenizer(text, add_special_tokens=False, split_special_tokens=not special)
        return list(encoded["input_ids"])

    def _run(
        self,
        request: GenerationRequest,
        prompt: list[int],
        budget: int,
        emit: Emit,
        cancelled: threading.Event,
    ) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer, model = self._tokenizer, self._model
        completion_total = 0

        class Collect(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False
                self.ids: list[int] = []
                self.on_token: Any = None

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    self.ids.append(int(token))
                    self.on_token(int(token))

            def end(self) -> None:
                return None

        class Stop(StoppingCriteria):
            def __init__(self, assembler: TextAssembler) -> None:
                self.assembler = assembler

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = cancelled.is_set() or self.assembler.stopped
                return torch.full(
                    (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
                )

        input_ids = torch.tensor([prompt], device=self.device)
        eos_ids = _as_list(model.generation_config.eos_token_id) or _as_list(tokenizer.eos_token_id)
        for index in range(request.n):
            torch.manual_seed(
                # A sampling seed, not a secret: `random` is right here.
                request.seed + index if request.seed is not None else random.getrandbits(31)  # nosec B311
            )
            assembler = TextAssembler(request.stop)
            streamer = Collect()
            decoded = ""

            def on_token(
                token: int,
                streamer: Collect = streamer,
                assembler: TextAssembler = assembler,
                index: int = index,
            ) -> None:
                nonlocal decoded
                if token in eos_ids:
                    return
                text = tokenizer.decode(
                    [t for t in streamer.ids if t not in eos_ids], skip_special_tokens=True
                )
                if text.endswith("\ufffd"):  # an incomplete character: wait for its next token
                    return
                piece, decoded = text[len(decoded) :], text
                out = assembler.feed(piece.encode())
                if out:
                    emit(Chunk(index=index, text=out))

            streamer.on_token = on_token
            sampling = request.temperature > 0
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=budget,
                do_sample=sampling,
                temperature=request.temperature if sampling else None,
                top_p=request.top_p if sampling else None,
                top_k=(request.top_k or None) if sampling else None,
                min_p=(request.min_p or None) if sampling else None,
                repetition_penalty=request.repeat_penalty,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([Stop(assembler)]),
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else (eos_ids[0] if eos_ids else 0),
            )
            if cancelled.is_set():
                return
            produced = len([t for t in streamer.ids if t not in eos_ids])
            finish = (
                "stop"
                if assembler.stopped or (streamer.ids and streamer.ids[-1] in eos_ids)
                else "length"
            )
            completion_total += produced
            last = index == request.n - 1
            emit(
                Chunk(
                    index=index,
                    text=assembler.flush(),
                    finish_reason=finish,
                    stop_sequence=assembler.matched,
                    usage=Usage(len(prompt), completion_total) if last else None,
                )
            )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]
