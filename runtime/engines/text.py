"""Turning generated token bytes into text chunks: UTF-8 safe across token boundaries, holding
back text that may be the start of a stop string, and cutting at the first stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any

# The prompt format used when a checkpoint carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_chat(template: str | None, messages: list[dict[str, Any]], **extra: Any) -> str:
    """Render a Hugging Face chat template in a sandbox (templates come with model files)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    compiled = environment.from_string(template or CHATML_TEMPLATE)
    return compiled.render(
        messages=messages, add_generation_prompt=True, raise_exception=raise_exception, **extra
    )


class TextAssembler:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is safe to send now."""
        self._pending += self._decoder.decode(data)
        if not self.stop:
            text, self._pending = self._pending, ""
            return text
        found = [(i, stop) for stop in self.stop if (i := self._pending.find(stop)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda hit: hit[0])
            text, self._pending = self._pending[:cut], ""
            self.stopped = True
            return text
        hold = self._held_back()
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return text

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing if a stop string was hit)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
