"""Keys stored in the database (`python -m runtime keys create` with the database integration),
looked up by digest when a presented key is not in the config's KeyRing.

A small TTL cache holds positive and negative answers, so a request does not query the database
each time and a revocation takes effect within `auth.cache_ttl_s`. When the database cannot
answer, a key the cache does not know is refused with 503, not 401: it may well be valid.
`last_used_at` is written in the background, at most once per `touch_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable

import structlog

from runtime.auth.keys import Principal, hash_key
from runtime.config_schema import RateLimitConfig
from runtime.persistence.api_keys import ApiKeyStore, StoredKey
from runtime.types import HandlerError

Clock = Callable[[], float]
StoreProvider = Callable[[], ApiKeyStore | None]  # None: the database is not running


def unavailable(reason: str) -> HandlerError:
    return HandlerError(
        503,
        f"API keys are checked against the database, which is unavailable ({reason}); "
        "retry shortly",
        type="service_unavailable",
        code="key_store_unavailable",
        headers={"retry-after": "5"},
    )


def principal_of(key: StoredKey, defaults: RateLimitConfig) -> Principal:
    limits = RateLimitConfig(
        requests_per_minute=defaults.requests_per_minute
        if key.requests_per_minute is None
        else key.requests_per_minute,
        tokens_per_minute=defaults.tokens_per_minute
        if key.tokens_per_minute is None
        else key.tokens_per_minute,
    )
    return Principal(key.name, frozenset(key.scopes), limits)


class StoredKeys:
    """The database's keys, as the auth plugin sees them."""

    def __init__(
        self,
        store: StoreProvider,
        defaults: RateLimitConfig,
        *,
        ttl_s: float = 5.0,
        max_entries: int = 10_000,
        touch_interval_s: float = 60.0,
        retry_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.store = store
        self.defaults = defaults
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.touch_interval_s = touch_interval_s
        # After a failed lookup, how long to answer 503 without trying: during an outage each
        # request would otherwise wait out its own connect attempt.
        self.retry_s = retry_s
        self._down: tuple[float, str] = (float("-inf"), "")
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._any: tuple[float, bool | None] = (float("-inf"), None)  # None: never answered
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}  # digest -> its query
        self._counting: asyncio.Future[None] | None = None  # the count() under way
        self._used: dict[str, float] = {}
        self._touched_at = float("-inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = structlog.get_logger("tiffin.auth")

    async def lookup(self, key: str) -> Principal | None:
        """The principal of a stored, unrevoked key; None for an unknown or revoked one.
        Raises a 503 HandlerError when the database cannot say. Requests presenting the same
        uncached key together share one query."""
        digest = hash_key(key)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > self.clock():
            principal = cached[1]
        else:
            task = self._pending.get(digest)
            if task is None:
                task = self._pending[digest] = asyncio.ensure_future(self._fetch(digest))
                task.add_done_callback(functools.partial(self._fetched, digest))
            principal = await asyncio.shield(task)
        if principal is not None:
            self._note_use(digest)
        return principal

    def _fetched(self, digest: str, task: asyncio.Future[Principal | None]) -> None:
        self._pending.pop(digest, None)
        if not task.cancelled() and task.exception() is None:
            self._remember(digest, (self.clock() + self.ttl_s, task.result()))

    async def any_issued(self) -> bool | None:
        """Whether the database holds a key, active or revoked: that turns auth on without
        `auth.required`, and revoking the last key must not turn it off again. Cached like
        lookups; while the database cannot answer (or within `retry_s` of a failure), the last
        answer stands. None until it has answered once: the caller must then not serve keyless
        requests (fail closed). One query at a time: while it runs, others get the old answer
        (or, with none yet, wait for that query)."""
        checked_at, answer = self._any
        now = self.clock()
        store = self.store()
        if store is None or now - checked_at < self.ttl_s or now < self._down[0]:
            return answer
        if self._counting is None:
            self._counting = asyncio.ensure_future(self._count(store))
        elif answer is not None:
            return answer
        await asyncio.shield(self._counting)
        return self._any[1]

    async def _count(self, store: ApiKeyStore) -> None:
        answer = self._any[1]
        try:
            answer = await store.count() > 0
        except Exception as exc:
            self._down = (self.clock() + self.retry_s, type(exc).__name__)
            self.log.warning("stored keys: cannot count", error=type(exc).__name__)
        finally:
            self._any = (self.clock(), answer)
            self._counting = None

    async def _fetch(self, digest: str) -> Principal | None:
        store = self.store()
        if store is None:
            raise unavailable("the database integration is not running")
        down_until, reason = self._down
        if self.clock() < down_until:
            raise unavailable(reason)
        try:
            found = await store.find(digest)
        except Exception as exc:
            self._down = (self.clock() + self.retry_s, type(exc).__name__)
            raise unavailable(type(exc).__name__) from None
        # The query matched on the digest; compare again in constant time, as KeyRing does.
        if found is None or not hmac.compare_digest(found.digest, digest) or not found.active:
            return None
        return principal_of(found, self.defaults)

    def _remember(self, digest: str, entry: tuple[float, Principal | None]) -> None:
        self._cache[digest] = entry
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    # --- last_used_at, in the background -------------------------------------------------------

    def _note_use(self, digest: str) -> None:
        self._used[digest] = time.time()
        if self.clock() - self._touched_at >= self.touch_interval_s:
            self._touched_at = self.clock()
            task = asyncio.get_running_loop().create_task(self.touch())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def touch(self) -> None:
        """Write the `last_used_at` of the keys used since the last write (never raises)."""
        used, self._used = self._used, {}
        store = self.store()
        if not used or store is None:
            return
        try:
            await store.touch(sorted(used.items()))
        except Exception as exc:  # kept for the next write
            self._used = {**used, **self._used}
            self.log.warning("stored keys: last_used_at not written", error=type(exc).__name__)

    async def close(self) -> None:
        """Wait for background writes and queries under way, then write what is left."""
        queries = [f for f in (self._counting, *self._pending.values()) if f is not None]
        for task in [*self._tasks, *queries]:
            with contextlib.suppress(Exception):
                await task
        await self.touch()
