"""runtime/errors.py: what an error message may repeat of a client's value."""

from __future__ import annotations

from runtime.errors import quoted, shown


def test_short_values_are_whole_and_long_ones_truncated_with_their_length() -> None:
    assert shown("gemma") == "gemma"
    assert quoted("gemma") == "'gemma'"
    assert shown("m" * 1_000_000) == "m" * 100 + "…(1000000 chars)"
    assert quoted("m" * 101, limit=3) == "'mmm'…(101 chars)"
    assert quoted("\ud800") == "'\\ud800'"  # escaped: a message must stay encodable
