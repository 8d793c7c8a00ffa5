"""Chat prompts as llama.cpp tokens, with only the chat template's own markup as control tokens.

A template renders everything into one string; tokenized whole with special tokens parsed, a
user's `<end_of_turn>\n<start_of_turn>model\n` would become real turn markers. So the template
is rendered with a mark in place of each message's text, and the pieces are tokenized apart:
the template's with special tokens, the messages' without (as llama.cpp's server does).
Engines that tokenize a rendered prompt whole (transformers, ExLlamaV2) refuse message text
that would become control tokens instead (`refuse_control_text`).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from runtime.types import UnsupportedRequest

# Stands in for a message's text while the template renders (private-use characters around a
# per-request nonce, so no client text can imitate it).
CONTENT_MARK = "\ue000{nonce}:{index}\ue001"
CONTENT_MARK_RE = "\ue000{nonce}:([0-9]+)\ue001"
# (messages, tools) -> llama-cpp-python's ChatFormatterResponse (prompt, stop, added_special).
Render = Callable[[list[dict[str, Any]], Any], Any]


def chat_tokens(
    llm: Any, render: Render, messages: list[dict[str, Any]], tools: Any = None
) -> tuple[list[int], list[str]]:
    """The prompt's tokens and the template's stop strings."""
    nonce = secrets.token_hex(8)
    contents: list[bytes] = []
    marked = []
    for position, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and content:
            contents.append(utf8(content, f"messages[{position}].content"))
            mark = CONTENT_MARK.format(nonce=nonce, index=len(contents) - 1)
            message = {**message, "content": mark}
        marked.append(message)
    formatted = render(marked, tools)
    pieces = re.split(CONTENT_MARK_RE.format(nonce=nonce), formatted.prompt)
    if any(nonce in piece for piece in pieces[::2]):
        # The template transformed a message's text (`| tojson`, say), so the marks are lost:
        # render the text itself, once sure that none of it would become markup.
        refuse_control_text(
            messages, lambda text, special: llm.tokenize(text.encode(), False, special)
        )
        formatted = render(messages, tools)
        pieces = [formatted.prompt]
    add_bos = not formatted.added_special
    tokens: list[int] = []
    for position, piece in enumerate(pieces):
        if position % 2:  # a message's text (a template may use it more than once)
            text, special = contents[int(piece)], False
        else:  # the template's markup (and whatever else it rendered: roles, tools...)
            text, special = utf8(piece, "messages"), True
        first = position == 0 and add_bos
        tokens += llm.tokenize(text, add_bos=first, special=special)
    extra = formatted.stop or []
    return tokens, [extra] if isinstance(extra, str) else list(extra)


def refuse_control_text(
    messages: list[dict[str, Any]], tokenize: Callable[[str, bool], Sequence[int]]
) -> None:
    """Refuse (400) a message whose text would tokenize into control tokens. `tokenize(text,
    special)` is the engine's tokenizer, with special tokens parsed or not. For engines whose
    chat prompt is tokenized whole (transformers, ExLlamaV2), this keeps a user's text from
    becoming the template's markup."""
    for position, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        utf8(content, f"messages[{position}].content")
        if list(tokenize(content, True)) != list(tokenize(content, False)):
            raise UnsupportedRequest(
                f"messages[{position}].content spells one of this model's control tokens (such"
                " as <end_of_turn>), which its chat template cannot keep apart from its own"
                " markup",
                f"messages[{position}].content",
            )


def utf8(text: str, field: str) -> bytes:
    """`text` as UTF-8; a lone surrogate (which JSON can carry as \\ud800) is the client's
    error, named, not a crash."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise UnsupportedRequest(
            f"{field} is not valid Unicode text: it has a lone surrogate"
            f" {text[exc.start]!a} at position {exc.start}",
            field,
        ) from None
