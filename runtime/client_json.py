"""JSON from clients, held to what everything downstream can take. Python's decoder accepts
more than that: an unpaired surrogate escape (`"\\ud800"`) becomes a string no UTF-8 encoder
takes (the llama.cpp engine fails on it with UnicodeEncodeError), and `NaN`, `Infinity` or
`1e400` become floats that are not finite (a C sampler gets garbage, or ctypes refuses it).
`decode` refuses both, saying where they are, so every transport can answer a 400.

Cheap for ordinary bodies: the walk that finds the place only runs when the raw text has a
surrogate escape or the decoder met a number that is not finite.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from runtime.errors import shown

# `\ud800`..`\udfff` as a JSON escape, either case. (A pattern that starts with a literal
# scans fast; one with an alternation of a character class would take 30 times as long.)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class InvalidJson(ValueError):
    """Client JSON that cannot be used: `reason` says why, `path` (`messages.0.content`)
    where, or None when the problem is not at one place (a syntax error)."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


def decode(raw: str | bytes) -> Any:
    """Decode `raw`, or raise InvalidJson. Besides syntax, Python's decoder also fails on
    input nested past its recursion limit and on integer literals over 4300 digits."""
    odd_numbers: list[str] = []

    def constant(literal: str) -> float:  # NaN, Infinity, -Infinity: not JSON at all
        odd_numbers.append(literal)
        return float(literal)

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):  # 1e400: JSON, but past what a double holds
            odd_numbers.append(literal)
        return value

    try:
        # Decoded here, strictly: json.loads would decode bytes with "surrogatepass", letting
        # a surrogate encoded in the bytes themselves (b"\xed\xa0\x80") through.
        text = raw.decode(json.detect_encoding(raw)) if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except RecursionError:
        raise InvalidJson("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise InvalidJson(str(exc).split("; use sys.")[0]) from None
    if odd_numbers or _SURROGATE_ESCAPE.search(text) or _has_surrogate(raw):
        _refuse_unusable(value, odd_numbers[0] if odd_numbers else "")
    return value


def _has_surrogate(raw: str | bytes) -> bool:
    """Whether a str came with a surrogate in it unescaped (bytes cannot: they were decoded
    strictly). Transports hand over text decoded strictly too; this is for any other caller."""
    if isinstance(raw, bytes) or raw.isascii():
        return False
    try:
        raw.encode()
    except UnicodeEncodeError:
        return True
    return False


def _refuse_unusable(value: Any, literal: str) -> None:
    """Raise InvalidJson for the first string with a lone surrogate or number that is not
    finite in `value`, in document order; return when there is none (the escape was in a
    valid pair, or quoted as text)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidJson(
                f"{shown(literal or repr(item))} is not a finite number "
                "(expected a number a double can hold; NaN and Infinity are not JSON)",
                shown(path) or None,
            )
        elif isinstance(item, dict):
            for key in item:
                _check_text(key, path, key=True)
            stack.extend((_join(path, key), item[key]) for key in reversed(list(item)))
        elif isinstance(item, list):
            stack.extend((_join(path, str(i)), item[i]) for i in reversed(range(len(item))))


def _check_text(text: str, path: str, *, key: bool = False) -> None:
    found = _SURROGATE.search(text)
    if found is None:
        return
    escape = f"\\u{ord(found.group()):04x}"
    what = "a key" if key else "text"
    raise InvalidJson(
        f"{what} with a lone surrogate {escape} is not valid Unicode (expected a "
        "\\ud800-\\udbff escape followed by a \\udc00-\\udfff one, or the character itself)",
        shown(path) or None,
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
