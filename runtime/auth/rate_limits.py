"""Per-key rate limits: requests and tokens per minute, counted in fixed one-minute windows.

The counters live behind `RateStore` so a shared store (Redis, so every worker and replica
sees one count) can replace `MemoryRateStore` without touching the limiter. `add` returns the
new count, which a Redis store does atomically with INCRBY + EXPIRE.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from runtime.config_schema import RateLimitConfig
from runtime.types import HandlerError

Clock = Callable[[], float]


@dataclass(frozen=True)
class Window:
    """A counter's value in the current window and when (clock seconds) that window ends."""

    used: int
    resets_at: float


class RateStore(Protocol):
    async def add(self, bucket: str, amount: int, window_s: float, now: float) -> Window:
        """Add `amount` to `bucket` in the window that holds `now`; return the new count."""
        ...

    async def peek(self, bucket: str, window_s: float, now: float) -> Window:
        """The count of `bucket` in the window that holds `now`."""
        ...


class MemoryRateStore:
    """Counters in this process (each worker counts its own requests)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[float, int]] = {}

    async def add(self, bucket: str, amount: int, window_s: float, now: float) -> Window:
        start = window_start(now, window_s)
        seen_start, used = self._counts.get(bucket, (start, 0))
        used = used + amount if seen_start == start else amount
        self._counts[bucket] = (start, used)
        return Window(used, start + window_s)

    async def peek(self, bucket: str, window_s: float, now: float) -> Window:
        start = window_start(now, window_s)
        seen_start, used = self._counts.get(bucket, (start, 0))
        return Window(used if seen_start == start else 0, start + window_s)


def window_start(now: float, window_s: float) -> float:
    """Start (clock seconds) of the fixed window that holds `now`."""
    return math.floor(now / window_s) * window_s


class RateLimiter:
    """Admits or refuses a key's requests by its `RateLimitConfig`."""

    def __init__(
        self,
        store: RateStore | None = None,
        *,
        clock: Clock = time.time,
        window_s: float = 60.0,
    ) -> None:
        self.store: RateStore = store or MemoryRateStore()
        self.clock = clock
        self.window_s = window_s

    async def admit(self, name: str, limits: RateLimitConfig) -> None:
        """Count one request; raise a 429 if it is over the requests limit, or the key has
        used its tokens for this window."""
        now = self.clock()
        if limits.requests_per_minute > 0:
            window = await self.store.add(f"{name}:requests", 1, self.window_s, now)
            if window.used > limits.requests_per_minute:
                raise _limited(name, "requests", limits.requests_per_minute, window, now)
        if limits.tokens_per_minute > 0:
            window = await self.store.peek(f"{name}:tokens", self.window_s, now)
            if window.used >= limits.tokens_per_minute:
                raise _limited(name, "tokens", limits.tokens_per_minute, window, now)

    async def used_tokens(self, name: str, tokens: int, limits: RateLimitConfig) -> None:
        """Count the tokens a generation used (prompt + completion)."""
        if limits.tokens_per_minute > 0 and tokens > 0:
            await self.store.add(f"{name}:tokens", tokens, self.window_s, self.clock())


def _limited(name: str, what: str, limit: int, window: Window, now: float) -> HandlerError:
    retry_after = max(1, math.ceil(window.resets_at - now))
    return HandlerError(
        429,
        f"API key {name!r} is over its limit of {limit} {what} per minute; "
        f"retry after {retry_after} s",
        type="rate_limit_error",
        code=f"{what}_per_minute",
        headers={"retry-after": str(retry_after)},
    )
