"""Tool calls in a model's own syntax, for `tool_choice: "auto"` on a model whose chat template
knows tools: the template renders the tools its own way, the model answers as it was trained
to, and `NativeCallParser` reads the calls out of its text as it streams. Text around a call
stays content; only what could be the start of a call is held back.

Formats, found in the chat template (`detect_format`):

- `hermes` (Hermes, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or (newer templates)
  `[TOOL_CALLS]name[ARGS]{...}`;
- `llama3` (Llama 3.1-3.3): a reply that is a JSON call, `{"name": ..., "parameters": {...}}`
  (after `<|python_tag|>` or alone), several separated by `;`;
- `gemma`: a ```` ```tool_code ```` block holding Python-style calls, `name(a=1, b="x")`.

A model whose template names none of these gets the generic JSON form instead
(runtime/tools.py).
"""

from __future__ import annotations

import ast
import json
import uuid
from typing import Any

from runtime.tool_scanner import reshaped
from runtime.types import Chunk, ToolCall

HERMES, MISTRAL, LLAMA3, GEMMA = "hermes", "mistral", "llama3", "gemma"
_OPENING = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]", GEMMA: "```tool_code"}
_CLOSING = {HERMES: "</tool_call>", GEMMA: "```"}


def detect_format(template: str | None) -> str | None:
    """The tool-call syntax a chat template teaches, or None when it knows no tools."""
    if not template or "tool" not in template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3
    if "tool_code" in template:
        return GEMMA
    return None


class NativeCallParser:
    """One choice's parser: `feed_text` each piece of text, `finish` at the end; each returns
    the content to show and the calls completed (whole calls, numbered in order). `feed` does
    the same for a Chunk."""

    def __init__(self, syntax: str) -> None:
        self.syntax = syntax
        self.buffer = ""  # text not yet given out: a possible or open call
        self.calls = 0
        self.started = False  # llama3: an answer (not a call) has begun
        self.whole_reply = False  # llama3: the reply is a call, kept until the end

    def feed(self, chunk: Chunk) -> Chunk:
        """The chunk as the client sees it (the same shape as ToolCallScanner's): its text
        split into content and whole calls, and "stop" as "tool_calls" once a call was made."""
        content, calls = self.feed_text(chunk.text)
        if chunk.finish_reason:
            more, more_calls = self.finish()
            content, calls = content + more, calls + more_calls
        return reshaped(chunk, content, calls, called=self.calls > 0)

    def feed_text(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        if self.syntax == LLAMA3:
            return self._llama3()
        content: list[str] = []
        calls: list[ToolCall] = []
        opening = _OPENING[self.syntax]
        while True:
            start = self.buffer.find(opening)
            if start < 0:
                keep = _partial_suffix(self.buffer, opening)
                content.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            content.append(self.buffer[:start])
            body_start = start + len(opening)
            closing = _CLOSING.get(self.syntax)
            if closing is None:  # mistral: the calls run to the end of the reply
                self.buffer = self.buffer[start:]
                break
            end = self.buffer.find(closing, body_start)
            if end < 0:
                self.buffer = self.buffer[start:]
                break
            parsed = self._parse(self.buffer[body_start:end])
            if not parsed:  # not a call after all: the model's text, shown as it was
                content.append(self.buffer[start : end + len(closing)])
            calls += parsed
            self.buffer = self.buffer[end + len(closing) :]
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the reply: a call still open is parsed if it can be; else its text is
        content after all (the model wrote something that only looked like a call)."""
        rest, self.buffer = self.buffer, ""
        if not rest:
            return "", []
        if self.syntax == LLAMA3:
            body = rest.strip().removeprefix("<|python_tag|>")
        else:
            opening = _OPENING[self.syntax]
            if not rest.startswith(opening):
                return rest, []
            body = rest[len(opening) :]
            closing = _CLOSING.get(self.syntax)
            if closing:
                body = body.removesuffix(closing)
        calls = self._parse(body)
        return ("", calls) if calls else (rest, [])

    # --- formats --------------------------------------------------------------------------------

    def _llama3(self) -> tuple[str, list[ToolCall]]:
        """A Llama 3 reply is a call or an answer from its first character on."""
        if self.whole_reply:
            return "", []
        stripped = self.buffer.lstrip()
        if not self.started:
            if not stripped:
                return "", []
            if stripped.startswith(("{", "<|python_tag|>")):
                self.whole_reply = True  # a call: kept until the end
                return "", []
            if "<|python_tag|>".startswith(stripped):
                return "", []  # maybe the tag's start
            self.started = True
        text, self.buffer = self.buffer, ""
        return text, []

    def _parse(self, body: str) -> list[ToolCall]:
        """The calls in one call's (or call list's) text; [] when it does not parse."""
        found: list[tuple[str, Any]] = []
        try:
            if self.syntax == GEMMA:
                found = _python_calls(body)
            elif self.syntax == MISTRAL and "[ARGS]" in body:
                for part in body.split(_OPENING[MISTRAL]):
                    name, _, arguments = part.partition("[ARGS]")
                    found.append((name.strip(), json.loads(arguments)))
            else:
                found = _json_calls(body)
        except (ValueError, SyntaxError):
            return []
        calls = []
        for name, arguments in found:
            if not isinstance(name, str) or not name or not isinstance(arguments, dict):
                return []
            calls.append(
                ToolCall(
                    index=self.calls,
                    id=f"call_{uuid.uuid4().hex[:24]}",
                    name=name,
                    arguments=json.dumps(arguments),
                )
            )
            self.calls += 1
        return calls


def _json_calls(body: str) -> list[tuple[str, Any]]:
    """`{"name", "arguments" | "parameters"}`, a list of them, or several joined by `;`."""
    text = body.strip()
    items: list[Any] = []
    decoder = json.JSONDecoder()
    while text:
        value, end = decoder.raw_decode(text)
        items += value if isinstance(value, list) else [value]
        text = text[end:].lstrip().lstrip(";").lstrip()
    calls: list[tuple[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("not a call")
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        calls.append((item["name"], arguments))
    return calls


def _python_calls(body: str) -> list[tuple[str, Any]]:
    """`name(a=1, b="x")` lines, keyword arguments with literal values only."""
    calls = []
    for node in ast.parse(body.strip()).body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError("not a call")
        arguments = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
        calls.append((call.func.id, arguments))
    return calls


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
