"""How many threads each llama.cpp step runs on, chosen by measuring.

llama.cpp's CPU threads meet at a barrier after every operation and spin there. On a quiet
machine two threads on two cores decode faster than one; on a machine where a neighbour holds a
core, the thread that lost its core holds up the other at every barrier, and a step takes ten to
fifty times longer (measured on the 2-core development machine: 1-2 tokens/s against 20-30 with
one thread). Which is faster depends on the machine's load, which changes while the model runs,
so the scheduler keeps both: `ThreadChooser` times every step, keeps a running cost per thread
count and batch size, runs each step on the cheaper one, and tries the other one step in
PROBE_EVERY so that it notices when the load changes.

With `engine_settings.n_threads` set, that count is used for every step and no chooser is made.
"""

from __future__ import annotations

from collections.abc import Callable

PROBE_EVERY = 32  # steps between two tries of the thread count not in use
WEIGHT = 0.3  # of a new timing in the running cost of the count in use


class ThreadChooser:
    """`set_threads(n)` sets the context's threads; `before`/`after` wrap every step."""

    def __init__(self, set_threads: Callable[[int], None], choices: tuple[int, ...]) -> None:
        self._set_threads = set_threads
        self.choices = tuple(sorted(set(choices), reverse=True))
        self.current = 0  # what the context is set to; 0: not yet
        self._costs: dict[tuple[int, int], float] = {}
        self._steps = 0
        self._probing = False
        self.switches = 0

    def before(self, tokens: int) -> None:
        """Set the context's threads for a step of `tokens` tokens."""
        self._steps += 1
        threads = self._pick(_size(tokens))
        if threads != self.current:
            self._set_threads(threads)
            self.switches += self.current != 0
            self.current = threads

    def after(self, tokens: int, seconds: float) -> None:
        key = (self.current, _size(tokens))
        previous = self._costs.get(key)
        if previous is None or self._probing:  # a probe's timing is news: it replaces the cost
            self._costs[key] = seconds
        else:
            self._costs[key] = (1 - WEIGHT) * previous + WEIGHT * seconds

    def _pick(self, size: int) -> int:
        known = [(self._costs[(t, size)], t) for t in self.choices if (t, size) in self._costs]
        untried = [t for t in self.choices if (t, size) not in self._costs]
        self._probing = bool(untried) or self._steps % PROBE_EVERY == 0
        if untried:
            return untried[0]
        best = min(known)[1]
        if self._probing:
            return next(t for t in self.choices if t != best)
        return best


def _size(tokens: int) -> int:
    """Steps are compared with steps of a like size: 1, 2-3, 4-7 ... tokens, 128 and more."""
    return min(tokens.bit_length(), 8)
