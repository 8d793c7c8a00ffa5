"""A circuit breaker for a remote provider: after `threshold` failures in a row it opens, and
requests fail fast instead of piling onto a provider that is down; after `reset_after_s` one
trial request is let through (half-open), and its outcome closes or re-opens the circuit.

What counts as a failure is the caller's to say; openai_compatible keeps one breaker for the
upstream (it cannot be reached) and one per upstream model (it answers that model with 5xx)."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = max(1, threshold)
        self.reset_after_s = reset_after_s
        self._clock = clock
        self.state = CircuitState.closed
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May a request go to the provider now? Moves an open circuit to half-open once its
        wait is over, letting one trial through."""
        if self.state is CircuitState.open and self.retry_in <= 0:
            self.state = CircuitState.half_open
            return True
        return self.state is CircuitState.closed

    @property
    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through."""
        return max(0.0, self.opened_at + self.reset_after_s - self._clock())

    def success(self) -> None:
        self.state = CircuitState.closed
        self.failures = 0

    def release(self) -> None:
        """A trial let through by `allow()` ended with no verdict on this provider (another
        breaker refused the request, or it failed for a reason that is not this one's): the
        circuit is open again with its wait over, so the next request is the trial."""
        if self.state is CircuitState.half_open:
            self.state = CircuitState.open

    def failure(self) -> None:
        self.failures += 1
        if self.state is CircuitState.half_open or self.failures >= self.threshold:
            self.state = CircuitState.open
            self.opened_at = self._clock()
