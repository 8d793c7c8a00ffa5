"""Token counts for a remote model's answer when its platform reports none, or only part.

What the platform reports wins. A count it leaves out (a server that ignores OpenAI's
`stream_options.include_usage`, an Ollama that drops `prompt_eval_count` for a cached prompt) or
reports as 0 for text that is not empty is filled in here, in this order:

- with the model's tokenizer, when the operator names one: `engine_settings.tokenizer` in the
  platform's `settings.models.<model>`, a Hugging Face `tokenizer.json` (needs the `tokenizers`
  package, which the cpu extra brings). Chat messages are counted without the model's chat
  template, plus a few tokens per message for it, so a chat prompt's count stays approximate;
- else estimated: about 4 characters a token (OpenAI's rule of thumb for English), at least 1
  for any text that is not empty, plus the same per-message allowance; the completion is also
  never counted below the number of streamed pieces (servers send about one a token).

Never 0 for a prompt that is not empty. Each engine logs once, per way of counting, that its
platform sent no count and how it was made up, so an estimate is never taken for a report.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.types import Chunk, EngineError, GenerationRequest, Usage

CHARS_PER_TOKEN = 4
# A chat template's tokens around each message (role, separators) and before the reply: the
# allowance OpenAI's cookbook counts for its chat models.
TOKENS_PER_MESSAGE = 3
TOKENS_BEFORE_REPLY = 3


def estimate_tokens(text: str) -> int:
    """About 4 characters a token; 0 only for empty text."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def message_texts(messages: Sequence[dict[str, Any]]) -> list[str]:
    """Each message's text: its `content` string, or the text parts of a content list."""
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            content = " ".join(p for p in parts if isinstance(p, str))
        texts.append(content if isinstance(content, str) else "")
    return texts


@dataclass
class Tally:
    """What one answer brought: text per choice, streamed pieces, and the platform's counts."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    pieces: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.text:
            self.texts.setdefault(chunk.index, []).append(chunk.text)
            self.pieces += 1

    def report(self, prompt_tokens: Any, completion_tokens: Any) -> None:
        """The platform's counts; anything that is not a count is left out."""
        prompt, completion = _count(prompt_tokens), _count(completion_tokens)
        self.prompt_tokens = self.prompt_tokens if prompt is None else prompt
        self.completion_tokens = self.completion_tokens if completion is None else completion

    @property
    def output(self) -> list[str]:
        return ["".join(parts) for parts in self.texts.values()]


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


class TokenCounter:
    """Fills in the counts a remote model's platform left out (see the module's docstring)."""

    def __init__(self, model_id: str, engine_settings: dict[str, Any], log: Any) -> None:
        self.model_id = model_id
        path = engine_settings.get("tokenizer")
        self.tokenizer_path = str(path) if path else None
        self._tokenizer: Any = None
        self.log = log
        self._noted: set[str] = set()

    @property
    def tokenizer(self) -> Any:
        """The loaded `tokenizers.Tokenizer`, or None."""
        return self._tokenizer

    @property
    def method(self) -> str:
        """How a missing count is made: `tokenizer` or `estimate`."""
        return "tokenizer" if self._tokenizer is not None else "estimate"

    async def load(self) -> None:
        """Read the configured tokenizer (off the event loop). Raises EngineError naming the
        setting when it cannot be used."""
        if self.tokenizer_path is None or self._tokenizer is not None:
            return
        self._tokenizer = await asyncio.to_thread(self._read_tokenizer, self.tokenizer_path)

    def _read_tokenizer(self, path: str) -> Any:
        where = f"engine_settings.tokenizer of {self.model_id}"
        if not Path(path).is_file():
            raise EngineError(f"{where}: no file {path!r}; expected a tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise EngineError(
                f"{where} needs the `tokenizers` package (pip install tiffin[cpu])"
            ) from None
        try:
            return Tokenizer.from_file(path)
        except Exception as exc:
            raise EngineError(
                f"{where}: {path!r} is not a tokenizer.json ({str(exc)[:200]})"
            ) from None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._tokenizer is not None:
            return max(1, len(self._tokenizer.encode(text, add_special_tokens=False).ids))
        return estimate_tokens(text)

    def count_prompt(self, request: GenerationRequest) -> int:
        if request.messages is None:
            return self.count(request.prompt or "")
        texts = message_texts(request.messages)
        return sum(self.count(t) + TOKENS_PER_MESSAGE for t in texts) + TOKENS_BEFORE_REPLY

    def usage(self, request: GenerationRequest, tally: Tally) -> Usage:
        """The answer's usage: the platform's counts, with what it left out filled in."""
        prompt = tally.prompt_tokens
        if not prompt:  # absent, or 0 for a prompt that is not empty
            counted = self.count_prompt(request)
            if counted:
                self._note("prompt_tokens")
                prompt = counted
        completion = tally.completion_tokens
        output = tally.output
        if not completion and any(output):
            self._note("completion_tokens")
            completion = sum(self.count(text) for text in output)
            if self._tokenizer is None:
                completion = max(completion, tally.pieces)
        return Usage(prompt or 0, completion or 0)

    def _note(self, what: str) -> None:
        key = f"{what}:{self.method}"
        if key not in self._noted:
            self._noted.add(key)
            how = "with its tokenizer" if self._tokenizer is not None else "estimated"
            self.log.info(
                f"platform reported no {what}; counted {how}",
                model=self.model_id,
                counted=self.method,
            )
