"""How many threads each llama.cpp step runs on: the cores no one else is using.

llama.cpp's CPU threads meet at a barrier after every operation and spin there. On a quiet
machine two threads on two cores decode faster than one; when a neighbour holds a core, the
thread that lost it holds up the others at every barrier, and a step takes ten to fifty times
longer (measured on the 2-core development machine: 1-2 tokens/s against 20-30 with one thread).
The machine's load changes while the model runs, so `ThreadChooser` looks at it: at most every
REFRESH_S it reads how much CPU time the whole machine used (`/proc/stat`) less what this process
used (`os.times()`), and gives llama.cpp the cores that time left free, at least one.

Probing (timing a step on the other thread count now and then) was tried first: under load, the
probe's own step took seconds and cost more than the spinning it avoided.

With `engine_settings.n_threads` set, that count is used for every step and no chooser is made;
where `/proc/stat` cannot be read (not Linux), all cores are used.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

REFRESH_S = 0.5  # how often the machine's load is read again
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal of /proc/stat's "cpu"


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the whole machine and by this process; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    machine = sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields)) / ticks
    mine = os.times()
    return machine, mine.user + mine.system


class ThreadChooser:
    """`set_threads(n)` sets the context's threads; `before()` runs ahead of every step."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        cores: int,
        read: Callable[[], tuple[float, float] | None] = cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._set_threads = set_threads
        self.cores = cores
        self._read = read
        self._clock = clock
        self._last: tuple[float, float, float] | None = None  # when, machine, mine
        self.current = 0  # what the context is set to; 0: not yet
        self.others = 0.0  # cores the rest of the machine kept busy, last reading
        self.switches = 0

    def before(self) -> None:
        now = self._clock()
        if self._last is None or now - self._last[0] >= REFRESH_S:
            self._measure(now)
        threads = max(1, min(self.cores, round(self.cores - self.others)))
        if threads != self.current:
            self._set_threads(threads)
            self.switches += self.current != 0
            self.current = threads

    def _measure(self, now: float) -> None:
        reading = self._read()
        if reading is None:
            self._last = (now, 0.0, 0.0)
            return
        machine, mine = reading
        if self._last is not None and now > self._last[0]:
            busy = (machine - self._last[1]) - (mine - self._last[2])
            self.others = max(0.0, busy / (now - self._last[0]))
        self._last = (now, machine, mine)
