"""The built-in auth plugin: checks every request's API key and scope in `authenticate`, and
counts the tokens of each generation against its key in `after_generate`.

A key is looked up in the config's KeyRing, then, if it is a JWT and OIDC is configured, verified
against the issuer's JWKS, else looked up among the keys stored in the database. It reads only
`event.headers`, so every transport is covered the same way (HTTP headers, gRPC
metadata, the WebSocket upgrade's headers or `token` parameter, GraphQL's request headers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hooks.specs import hookimpl
from runtime.auth.keys import PUBLIC, KeyRing, Principal, presented_key
from runtime.auth.oidc import OidcVerifier, looks_like_jwt
from runtime.auth.rate_limits import RateLimiter
from runtime.auth.stored import StoredKeys, unavailable
from runtime.types import HandlerError

CHALLENGE = {"www-authenticate": "Bearer"}
BATCH_TRANSPORT = "batch"  # runtime/batches/batch_worker.py's events


class AuthPlugin:
    """Refuses requests without a known key (401) or without the route's scope (403), and
    over their key's rate limits (429). Off when `enforced` is false: requests then carry no
    principal and have no limits."""

    def __init__(
        self,
        keys: KeyRing,
        route_scopes: Mapping[str, str],
        limiter: RateLimiter,
        *,
        enforced: bool,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self.keys = keys
        self.route_scopes = dict(route_scopes)
        self.limiter = limiter
        self.enforced = enforced
        self.stored: StoredKeys | None = None  # set when the database integration is selected
        self.oidc: OidcVerifier | None = oidc

    @hookimpl(trylast=True)
    async def authenticate(self, event: Any, ctx: Any) -> None:
        if event.transport == BATCH_TRANSPORT and event.principal is not None:
            # A batch line runs as the key that made the batch, checked then; batch work has
            # its own pace (batch.max_share), not the key's per-minute limits.
            ctx.principal = event.principal
            ctx.log = ctx.log.bind(principal=event.principal.name)
            return
        issued: bool | None = True
        if not self.enforced:
            issued = await self.stored.any_issued() if self.stored else False
            if issued is False:
                return
        scope = self.route_scopes.get(event.route, "inference")
        key = presented_key(event.headers)
        principal = await self.identify(key) if key else None
        if principal is None:
            if scope == PUBLIC:
                return
            if key is None and issued is None:  # stored keys may exist: fail closed
                raise unavailable("it has not answered since start")
            raise HandlerError(
                401,
                "an API key is required: send `Authorization: Bearer <key>` or `x-api-key`"
                if key is None
                else "the API key is not valid",
                type="authentication_error",
                code="missing_api_key" if key is None else "invalid_api_key",
                headers=CHALLENGE,
            )
        event.principal = principal
        ctx.principal = principal
        ctx.log = ctx.log.bind(principal=principal.name)  # the key's name, never the key
        if not principal.allows(scope):
            raise HandlerError(
                403,
                f"API key {principal.name!r} lacks the {scope!r} scope this route needs",
                type="permission_error",
                code="insufficient_scope",
            )
        await self.limiter.admit(principal.name, principal.limits)

    async def identify(self, key: str) -> Principal | None:
        """A config key, else a JWT when OIDC is on, else a key stored in the database."""
        principal = self.keys.lookup(key)
        if principal is not None:
            return principal
        if self.oidc is not None and looks_like_jwt(key):
            return await self.oidc.verify(key)
        if self.stored is not None:
            return await self.stored.lookup(key)
        return None

    @hookimpl(trylast=True)
    async def after_generate(self, request: Any, response: Any, ctx: Any) -> None:
        principal = getattr(ctx, "principal", None)
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if not isinstance(principal, Principal) or usage is None:
            return
        tokens = int(getattr(usage, "prompt_tokens", 0)) + int(
            getattr(usage, "completion_tokens", 0)
        )
        await self.limiter.used_tokens(principal.name, tokens, principal.limits)
