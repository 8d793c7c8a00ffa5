"""API-key authentication, scopes and per-key rate limits, owned by the Runtime.

    auth = Auth.from_settings(settings)     # keys hashed here; the plain keys are dropped
    runtime.plugins.register(auth.plugin)   # authenticate / after_generate (trylast)

`keys.py` makes and recognises keys, `limits.py` counts requests and tokens per key,
`plugin.py` is the hook implementation, `cli.py` is `python -m runtime keys ...`.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.auth.keys import PUBLIC, SCOPES, KeyRing, Principal, hash_key, new_key, presented_key
from runtime.auth.oidc import OidcVerifier
from runtime.auth.plugin import AuthPlugin
from runtime.auth.rate_limits import Clock, MemoryRateStore, RateLimiter, RateStore, Window
from runtime.auth.stored import StoredKeys, StoreProvider
from runtime.config_schema import TiffinConfig
from runtime.errors import ConfigError

__all__ = [
    "Auth",
    "AuthPlugin",
    "Clock",
    "KeyRing",
    "MemoryRateStore",
    "OidcVerifier",
    "Principal",
    "RateLimiter",
    "RateStore",
    "StoredKeys",
    "Window",
    "hash_key",
    "new_key",
    "presented_key",
]


@dataclass
class Auth:
    """The runtime's key ring, limiter and plugin."""

    keys: KeyRing
    limiter: RateLimiter
    plugin: AuthPlugin
    # Keys declared in auth.keys with no value (their environment variable unset).
    unset_keys: tuple[str, ...] = ()

    @property
    def enforced(self) -> bool:
        return self.plugin.enforced

    def keyless_warning(self) -> str | None:
        """Why no request can authenticate, when auth is on (`auth.required`) with no config
        key, no OIDC and no database of keys: every route but the public ones answers 401.
        None otherwise (a database may hold keys this cannot see from here)."""
        plugin = self.plugin
        if not plugin.enforced or len(self.keys) or plugin.oidc or plugin.stored is not None:
            return None
        unset = ""
        if self.unset_keys:
            names = ", ".join(self.unset_keys)
            several = len(self.unset_keys) > 1
            variables = "are their environment variables" if several else "is its variable"
            unset = f" (auth.keys declares {names} with no value: {variables} set?)"
        return (
            "auth is on (auth.required) but no API key is configured"
            f"{unset}, so every request except public routes gets 401; make a key with"
            " `python -m runtime keys create --name NAME --scope admin [overrides...]`"
            " (add integrations=database to store it in the database) or configure auth.oidc"
        )

    @classmethod
    def from_settings(cls, settings: TiffinConfig, limiter: RateLimiter | None = None) -> Auth:
        """Hash the configured keys, then blank them in `settings` so the Runtime holds no
        plain key (`cfg` keeps `${oc.env:...}` references, not values). Enforced when
        `auth.required` or when any key is configured."""
        auth = settings.auth
        keys = KeyRing.from_config(auth.keys, auth.limits)
        unset = tuple(d.name for d in auth.keys if not d.key and not d.key_sha256.strip())
        for declared in auth.keys:
            declared.key = ""
        limiter = limiter or RateLimiter()
        scopes = {name: route.scope for name, route in settings.handlers.routes.items()}
        for name, scope in scopes.items():
            if scope not in (*SCOPES, PUBLIC):
                raise ConfigError(
                    f"handlers.routes.{name}.scope", scope, "one of: inference, admin, public"
                )
        oidc = OidcVerifier(auth.oidc, auth.limits) if auth.oidc.jwks_url else None
        enforced = auth.required or len(keys) > 0 or oidc is not None
        plugin = AuthPlugin(keys, scopes, limiter, enforced=enforced, oidc=oidc)
        return cls(keys, limiter, plugin, unset_keys=unset)

    def use_store(self, store: StoreProvider, settings: TiffinConfig) -> StoredKeys:
        """Look keys up in the database too (the database integration is selected); auth is
        then enforced as soon as it holds a key (revoked ones too)."""
        stored = StoredKeys(store, settings.auth.limits, ttl_s=settings.auth.cache_ttl_s)
        self.plugin.stored = stored
        return stored

    async def close(self) -> None:
        if self.plugin.stored is not None:
            await self.plugin.stored.close()
