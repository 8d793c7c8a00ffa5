"""Stored API keys on one SQLAlchemy async engine: issue, find by digest, list, revoke, and the
background `last_used_at` touch. Only digests are stored; the plain key never reaches here."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from runtime.persistence.tables import api_keys


class KeyExists(Exception):
    """An active key already has this name."""


@dataclass(frozen=True)
class StoredKey:
    name: str
    digest: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _stored(row: object) -> StoredKey:
    values = dict(row._mapping)  # type: ignore[attr-defined]
    values.pop("id", None)
    values["scopes"] = tuple(s for s in str(values["scopes"]).split(",") if s)
    return StoredKey(**values)


class ApiKeyStore:
    """The `api_keys` table on `engine` (swappable, like RequestLogStore's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        name: str,
        digest: str,
        scopes: Iterable[str],
        *,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> StoredKey:
        key = StoredKey(
            name,
            digest,
            tuple(dict.fromkeys(scopes)),
            time.time(),
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        values = {**key.__dict__, "scopes": ",".join(key.scopes)}
        try:
            async with self.engine.begin() as connection:
                await connection.execute(api_keys.insert().values(**values))
        except IntegrityError:
            raise KeyExists(f"an active key is already named {name!r}") from None
        return key

    async def find(self, digest: str) -> StoredKey | None:
        """The key with this digest, revoked or not."""
        query = select(api_keys).where(api_keys.c.digest == digest)
        async with self.engine.connect() as connection:
            row = (await connection.execute(query)).first()
        return None if row is None else _stored(row)

    async def all(self) -> list[StoredKey]:
        query = select(api_keys).order_by(api_keys.c.created_at)
        async with self.engine.connect() as connection:
            return [_stored(row) for row in await connection.execute(query)]

    async def count(self) -> int:
        """Keys issued, revoked ones included."""
        query = select(func.count()).select_from(api_keys)
        async with self.engine.connect() as connection:
            return int((await connection.execute(query)).scalar_one())

    async def revoke(self, name: str) -> bool:
        """Revoke the active key named `name`; False when there is none."""
        statement = (
            update(api_keys)
            .where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=time.time())
        )
        async with self.engine.begin() as connection:
            return bool((await connection.execute(statement)).rowcount)

    async def touch(self, used: Sequence[tuple[str, float]]) -> None:
        """Set `last_used_at` of each (digest, when) in one statement."""
        if not used:
            return
        statement = (
            update(api_keys)
            .where(api_keys.c.digest == bindparam("d"))
            .values(last_used_at=bindparam("at"))
        )
        async with self.engine.begin() as connection:
            await connection.execute(statement, [{"d": d, "at": at} for d, at in used])
