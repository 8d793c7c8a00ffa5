"""Errors that cross module boundaries, each able to say what went wrong in one line."""

from __future__ import annotations

# How much of a client's value an error message repeats: enough to recognise it, never so
# much that the message outgrows a gRPC status (8 KiB of metadata) or floods a log line.
SHOWN_CHARS = 100


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` as an error message may repeat it: whole when short, else its first `limit`
    characters and its length (`mmm…(1000000 chars)`)."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…({len(value)} chars)"


def quoted(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted as `repr` quotes it (control characters and surrogates escaped),
    truncated as `shown` does: `'mmm'…(1000000 chars)`."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({len(value)} chars)"


class TiffinError(Exception):
    """Base class for Tiffin's own errors."""


class ConfigError(TiffinError):
    """A composed config that cannot run: names the key, the bad value and what was expected.

    The CLI prints `str(error)` as one line and exits 2.
    """

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"{key}: got {value!r}, expected {expected}")


class StartupError(TiffinError):
    """A required integration could not be started; the service must not come up."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"required integration {name!r} failed to start: {reason}")


# Where a BentoML worker started by `python -m runtime` records a StartupError for the CLI.
STARTUP_FAILURE_FILE = "startup-failure.json"
