"""Rate-limit counters in Redis, so every worker and replica counts one total per key.

One key per bucket and window (`<prefix>rate:<bucket>:<window start>`), raised with INCRBY and
given an EXPIRE in the same MULTI, so a count never outlives its window by more than the slack
and two processes never lose an increment. While Redis is down the counts are this process's
own (`MemoryRateStore`): requests are still limited, per process, and never wait on Redis.
"""

from __future__ import annotations

import asyncio
import math

from runtime.auth.rate_limits import MemoryRateStore, Window, window_start
from runtime.integrations.redis.redis_link import RedisLink

# Keys stay a little past their window: relative to Redis's clock, not the limiter's, which
# tests (and skewed replicas) may set apart.
EXPIRY_SLACK_S = 5


class RedisRateStore:
    """A `RateStore` in Redis while the link is up, in this process's memory while it is not."""

    def __init__(self, link: RedisLink, prefix: str) -> None:
        self.link = link
        self.prefix = prefix
        self.fallback = MemoryRateStore()
        self.shared_adds = self.fallback_adds = 0

    def _key(self, bucket: str, window_s: float, now: float) -> tuple[str, float]:
        start = window_start(now, window_s)
        return f"{self.prefix}rate:{bucket}:{int(start)}", start

    async def add(self, bucket: str, amount: int, window_s: float, now: float) -> Window:
        if self.link.up:
            key, start = self._key(bucket, window_s, now)
            try:
                async with self.link.commands.pipeline(transaction=True) as pipe:
                    pipe.incrby(key, amount)
                    pipe.expire(key, math.ceil(window_s) + EXPIRY_SLACK_S)
                    used, _ = await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.failed(exc)
            else:
                self.shared_adds += 1
                return Window(int(used), start + window_s)
        self.fallback_adds += 1
        return await self.fallback.add(bucket, amount, window_s, now)

    async def peek(self, bucket: str, window_s: float, now: float) -> Window:
        if self.link.up:
            key, start = self._key(bucket, window_s, now)
            try:
                used = await self.link.commands.get(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.link.failed(exc)
            else:
                return Window(int(used or 0), start + window_s)
        return await self.fallback.peek(bucket, window_s, now)
