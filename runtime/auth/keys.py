"""API keys: how they are made, how a request presents one, and the ring of known keys.

Keys are random tokens (`tk-` + 32 random bytes, URL-safe), so the ring keeps only their
SHA-256: a slow password hash (bcrypt, scrypt) protects guessable secrets against brute force,
and 256 bits of randomness need no such protection. The digest of a presented key is compared
with every known digest by `hmac.compare_digest`, so timing says nothing about near misses.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from runtime.config_schema import ApiKeyConfig, RateLimitConfig
from runtime.errors import ConfigError

PREFIX = "tk-"
SCOPES = frozenset({"inference", "admin"})
PUBLIC = "public"


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's name and scopes (set as `event.principal`)."""

    name: str
    scopes: frozenset[str]
    limits: RateLimitConfig = field(default_factory=RateLimitConfig, compare=False)

    def allows(self, scope: str) -> bool:
        """`admin` includes `inference`: an operator's key can do what a client's can."""
        return scope == PUBLIC or scope in self.scopes or "admin" in self.scopes


def new_key() -> str:
    """A fresh random key, shown once by `python -m runtime keys create`."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key in `Authorization: Bearer <key>` or `x-api-key: <key>` (header names in any
    case: gRPC metadata and ASGI headers are lower case, tests' dicts may not be)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    authorization = lowered.get("authorization", "").strip()
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = lowered.get("x-api-key", "").strip()
    return api_key or None


@dataclass(frozen=True)
class _Entry:
    digest: str
    principal: Principal


class KeyRing:
    """The known keys, as digests only."""

    def __init__(self, entries: Iterable[_Entry] = ()) -> None:
        self._entries = list(entries)

    @classmethod
    def from_config(cls, keys: Iterable[ApiKeyConfig], defaults: RateLimitConfig) -> KeyRing:
        entries: list[_Entry] = []
        for index, declared in enumerate(keys):
            where = f"auth.keys[{index}]"
            digest = declared.key_sha256.strip().lower()
            if declared.key:
                digest = hash_key(declared.key)
            if not digest:
                continue  # its environment variable is unset: the key is not offered
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{where}.key_sha256", "(hidden)", "a hex SHA-256 digest")
            unknown = sorted(set(declared.scopes) - SCOPES)
            if unknown:
                raise ConfigError(f"{where}.scopes", unknown[0], f"one of: {', '.join(SCOPES)}")
            principal = Principal(
                declared.name, frozenset(declared.scopes), declared.limits or defaults
            )
            entries.append(_Entry(digest, principal))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> Principal | None:
        digest = hash_key(key)
        found: Principal | None = None
        for entry in self._entries:  # no early exit: every lookup does the same work
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        return found

    def names(self) -> list[str]:
        return [entry.principal.name for entry in self._entries]
