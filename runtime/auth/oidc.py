"""OIDC/JWT bearer tokens: verified against the issuer's JWKS with PyJWT (signature, exp, nbf,
iss, aud), their claims mapped to scopes.

The JWKS is fetched with httpx (never blocking the event loop) and kept `jwks_cache_s`; a token
signed with a key id the cached set lacks makes one refetch (the issuer rotated its keys), at
most once per 10 s so a stream of forged kids cannot hammer the issuer. A failed fetch keeps
the old set (its keys still verify) and makes a kid it lacks 503, retried after 10 s. The token
itself never reaches a log or an error message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from runtime.auth.keys import SCOPES, Principal
from runtime.config_schema import OidcConfig, RateLimitConfig
from runtime.types import HandlerError

Clock = Callable[[], float]
REFETCH_MIN_S = 10.0
CHALLENGE = 'Bearer error="invalid_token"'
PREFIX = "oidc:"  # of every principal a token names


def looks_like_jwt(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and all(parts)


def invalid_token(why: str, detail: str = "") -> HandlerError:
    """`why` is fixed text (it goes into the WWW-Authenticate header, latin-1 and quoted);
    `detail`, which may quote the token's own header, only into the JSON message."""
    return HandlerError(
        401,
        f"the bearer token is not valid: {detail or why}",
        type="authentication_error",
        code="invalid_token",
        headers={"www-authenticate": f'{CHALLENGE}, error_description="{why}"'},
    )


class OidcVerifier:
    """Verifies JWTs of one issuer."""

    def __init__(
        self,
        config: OidcConfig,
        defaults: RateLimitConfig,
        *,
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.defaults = defaults
        self.clock = clock
        self._client = client
        self._keys: dict[str, Any] = {}  # kid -> PyJWK
        self._fetched_at = float("-inf")  # the last attempt, successful or not
        self._failed = ""  # why the last attempt failed; "" when it succeeded
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> Principal:
        """The principal a valid token names; a 401 HandlerError (invalid_token) otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid_token("malformed token") from None
        algorithm = str(header.get("alg", ""))
        if algorithm not in self.config.algorithms:
            shown = algorithm if len(algorithm) <= 20 else f"{algorithm[:20]}..."
            raise invalid_token("algorithm not accepted", f"algorithm {shown!r} is not accepted")
        key = await self._key(str(header.get("kid", "")))
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(self.config.algorithms),
                audience=self.config.audience or None,
                issuer=self.config.issuer or None,
                leeway=self.config.leeway_s,
                options={"require": ["exp"], "verify_aud": bool(self.config.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise invalid_token("token expired") from None
        except jwt.ImmatureSignatureError:
            raise invalid_token("token not yet valid (nbf)") from None
        except jwt.InvalidAudienceError:
            raise invalid_token("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise invalid_token("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise invalid_token("bad signature") from None
        except jwt.PyJWTError as exc:
            raise invalid_token(type(exc).__name__) from None
        name = claims.get(self.config.name_claim)
        if not isinstance(name, str) or not name:
            raise invalid_token("no name claim", f"no {self.config.name_claim!r} claim")
        # Prefixed: a token's subject never shares rate limits or usage rows with a key that
        # happens to bear the same name.
        return Principal(f"{PREFIX}{name}", self.scopes(claims), self.defaults)

    def scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        """The claim's values (a space-separated string or a list), each mapped through
        `scope_map` when listed there, kept when a Tiffin scope itself."""
        raw = claims.get(self.config.scope_claim, [])
        if isinstance(raw, str):
            values = raw.split()
        elif isinstance(raw, list):
            values = [v for v in raw if isinstance(v, str)]
        else:  # a number, an object, null: no scopes, not a 500
            values = []
        found: set[str] = set()
        for value in values:
            if value in self.config.scope_map:
                found.update(self.config.scope_map[value])
            elif value in SCOPES:
                found.add(value)
        return frozenset(found & SCOPES)

    async def _key(self, kid: str) -> Any:
        # After a failed fetch, try again within REFETCH_MIN_S rather than the whole cache time.
        max_age = REFETCH_MIN_S if self._failed else self.config.jwks_cache_s
        if self.clock() - self._fetched_at >= max_age:
            await self._fetch(self._fetched_at)
        if kid not in self._keys and self.clock() - self._fetched_at >= REFETCH_MIN_S:
            await self._fetch(self._fetched_at)  # the issuer may have rotated its keys
        if kid in self._keys:  # the last key set that came, even when a refetch failed since
            return self._keys[kid]
        if not kid and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        if self._failed:  # the key may well be in the set we could not fetch
            raise HandlerError(
                503,
                f"the OIDC key set cannot be fetched ({self._failed}); retry shortly",
                type="service_unavailable",
                code="jwks_unavailable",
                headers={"retry-after": "5"},
            )
        raise invalid_token("unknown signing key (kid)")

    async def _fetch(self, seen: float) -> None:
        """Fetch the JWKS, unless another request did since `seen` (requests arriving together
        with a new kid make one fetch, not one each). A failure keeps the old set and is
        remembered in `_failed`."""
        async with self._lock:
            if self._fetched_at != seen:
                return
            self._fetched_at = self.clock()
            try:
                client = self._client or httpx.AsyncClient(timeout=self.config.timeout_s)
                try:
                    response = await client.get(self.config.jwks_url)
                    response.raise_for_status()
                    jwks = jwt.PyJWKSet.from_dict(response.json())
                finally:
                    if self._client is None:
                        await client.aclose()
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                self._failed = type(exc).__name__
                return
            self._keys = {str(k.key_id or ""): k for k in jwks.keys}
            self._failed = ""
