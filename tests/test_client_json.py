"""runtime/client_json.py: JSON from clients, refused when it holds text that is not valid
Unicode or numbers that are not finite, saying where; anything else decodes as json.loads."""

from __future__ import annotations

import json

import pytest

from runtime.client_json import InvalidJson, decode


@pytest.mark.parametrize(
    ("raw", "path", "says"),
    [
        (b'{"a": [1, {"b": "x\\ud800y"}]}', "a.1.b", "\\ud800"),
        (b'{"a": "\\uDFFF"}', "a", "\\udfff"),  # a lone low one, in capitals
        (b'{"a": "\\ud83d\\ud83d\\ude00"}', "a", "\\ud83d"),  # a pair after a lone high one
        (b'{"ok": 1, "\\ud800": 2}', None, "a key"),
        (b'"\\ud800"', None, "\\ud800"),
        (b'{"a": "\xed\xa0\x80"}', None, "can't decode"),  # the surrogate as bytes (WTF-8)
        ('{"a": "\\ud800"}'.encode("utf-16"), "a", "\\ud800"),  # escapes in UTF-16 too
        (b'{"t": NaN}', "t", "NaN"),
        (b'{"t": [0.5, -Infinity]}', "t.1", "-Infinity"),
        (b'{"t": 1e400}', "t", "1e400"),
        (b"[" * 3000 + b"]" * 3000, None, "nested too deeply"),
    ],
)
def test_refused_with_where_and_why(raw: bytes, path: str | None, says: str) -> None:
    with pytest.raises(InvalidJson) as refused:
        decode(raw)
    assert refused.value.path == path
    assert says in refused.value.reason


def test_valid_pairs_quoted_escapes_and_big_but_finite_numbers_decode_as_json_loads() -> None:
    raw = b'{"e": "\\ud83d\\ude00", "q": "\\\\ud800", "n": 1e308, "i": 123456789012345678901}'
    assert (
        decode(raw)
        == json.loads(raw)
        == {
            "e": "\U0001f600",
            "q": "\\ud800",
            "n": 1e308,
            "i": 123456789012345678901,
        }
    )


def test_a_long_path_is_shown_truncated() -> None:
    key = "k" * 5000
    with pytest.raises(InvalidJson) as refused:
        decode(json.dumps({key: "\ud800"}))
    assert refused.value.path is not None and len(refused.value.path) < 200
