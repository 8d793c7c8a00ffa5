"""OIDC/JWT bearer tokens (runtime/auth/oidc.py): RSA keys made here, their JWKS served from a
loopback HTTP server, tokens signed with PyJWT; valid, expired, wrong audience, wrong key, an
unknown kid (the JWKS fetched again once), claims mapped to scopes (403 on an admin route)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from runtime.app import Runtime
from runtime.auth import OidcVerifier
from runtime.config_schema import OidcConfig, RateLimitConfig
from tests.test_auth import APP, KEYS, FakeClock, http_client
from tests.test_openai_api import ScriptedEngines
from tests.thread_server import ThreadServer

MakeRuntime = Callable[..., Runtime]
ISSUER = "https://login.example.test"


class Issuer:
    """An identity provider's signing keys and its JWKS endpoint (counting fetches)."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {"k1": new_rsa()}
        self.fetches = 0
        self.failing = False  # answer 500, as an issuer having a bad minute does
        self.server = ThreadServer()

    def jwks(self) -> dict[str, Any]:
        found = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            found.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": found}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.fetches += 1
        body = json.dumps(self.jwks()).encode()
        headers = [(b"content-type", b"application/json")]
        status = 500 if self.failing else 200
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def token(
        self,
        kid: str = "k1",
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": "tiffin", "sub": "alice", "iat": now, "exp": now + 300}
        signer = key or self.keys[kid]
        return jwt.encode({**payload, **claims}, signer, algorithm="RS256", headers={"kid": kid})


def new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    found = Issuer()
    found.server.serve(found, "jwks")
    yield found
    found.server.stop()


def oidc_overrides(issuer: Issuer) -> list[str]:
    return [
        f"auth.oidc.jwks_url={issuer.server.url}/.well-known/jwks.json",
        f"auth.oidc.issuer='{ISSUER}'",
        "auth.oidc.audience=tiffin",
        "auth.oidc.scope_claim=roles",
        "+auth.oidc.scope_map.tiffin-ops=[admin]",
        "+auth.oidc.scope_map.tiffin-users=[inference]",
    ]


@pytest.fixture
async def http(make_runtime: MakeRuntime, issuer: Issuer) -> AsyncIterator[httpx.AsyncClient]:
    runtime = make_runtime(*oidc_overrides(issuer), KEYS, builtins=[ScriptedEngines()])
    assert runtime.auth.enforced
    async with await http_client(runtime) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_valid_tokens_map_claims_to_scopes(http: httpx.AsyncClient, issuer: Issuer) -> None:
    user = issuer.token(roles=["tiffin-users", "someone-else"])
    assert (await http.get("/v1/models", headers=bearer(user))).status_code == 200
    forbidden = await http.get("/admin/requests", headers=bearer(user))
    assert forbidden.status_code == 403
    assert "'oidc:alice' lacks the 'admin' scope" in forbidden.json()["error"]["message"]
    ops = issuer.token(sub="bob", roles=["tiffin-ops"])
    assert (await http.get("/admin/requests", headers=bearer(ops))).status_code == 200
    no_roles = issuer.token()
    assert (await http.get("/v1/models", headers=bearer(no_roles))).status_code == 403
    assert (await http.get("/v1/models", headers=APP)).status_code == 200  # config keys still
    assert issuer.fetches == 1  # the JWKS is cached


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"iss": "https://evil.test"}, "wrong issuer"),
        ({"nbf": int(time.time()) + 3600}, "token not yet valid (nbf)"),
    ],
)
async def test_invalid_tokens_are_401_invalid_token(
    http: httpx.AsyncClient, issuer: Issuer, claims: dict[str, Any], why: str
) -> None:
    token = issuer.token(roles=["tiffin-ops"], **claims)
    refused = await http.get("/v1/models", headers=bearer(token))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_token"
    assert refused.json()["error"]["message"] == f"the bearer token is not valid: {why}"
    assert refused.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert token not in refused.text and token not in json.dumps(dict(refused.headers))


async def test_a_token_signed_with_another_key_is_refused(
    http: httpx.AsyncClient, issuer: Issuer
) -> None:
    forged = issuer.token(key=new_rsa(), roles=["tiffin-ops"])  # claims kid k1
    refused = await http.get("/admin/requests", headers=bearer(forged))
    assert refused.status_code == 401
    assert refused.json()["error"]["message"].endswith("bad signature")


async def test_an_unknown_kid_fetches_the_jwks_again_once(
    make_runtime: MakeRuntime, issuer: Issuer
) -> None:
    runtime = make_runtime(*oidc_overrides(issuer), builtins=[ScriptedEngines()])
    verifier = runtime.auth.plugin.oidc
    assert verifier is not None
    verifier.clock = clock = FakeClock(1000.0)
    async with await http_client(runtime) as http:
        first = issuer.token(roles=["tiffin-users"])
        assert (await http.get("/v1/models", headers=bearer(first))).status_code == 200
        assert issuer.fetches == 1
        issuer.keys["k2"] = new_rsa()  # the provider rotates its keys
        clock.now += 30
        rotated = issuer.token(kid="k2", roles=["tiffin-users"])
        assert (await http.get("/v1/models", headers=bearer(rotated))).status_code == 200
        assert issuer.fetches == 2
        unknown = issuer.token(kid="k9", key=new_rsa())
        clock.now += 30
        refused = await http.get("/v1/models", headers=bearer(unknown))
        assert refused.status_code == 401 and "unknown signing key" in refused.text
        assert issuer.fetches == 3  # fetched once more, still unknown
        again = await http.get("/v1/models", headers=bearer(unknown))
        assert again.status_code == 401
        assert issuer.fetches == 3  # forged kids do not make every request fetch


async def test_an_unreachable_jwks_is_503(make_runtime: MakeRuntime, issuer: Issuer) -> None:
    runtime = make_runtime(*oidc_overrides(issuer), builtins=[ScriptedEngines()])
    token = issuer.token(roles=["tiffin-users"])
    issuer.server.stop()
    async with await http_client(runtime) as http:
        down = await http.get("/v1/models", headers=bearer(token))
    assert down.status_code == 503 and down.json()["error"]["code"] == "jwks_unavailable"


@pytest.mark.parametrize("algorithm", ["RS256\u2603", 'RS"256', "X" * 300])
async def test_an_odd_algorithm_is_401_with_a_well_formed_challenge(
    http: httpx.AsyncClient, algorithm: str
) -> None:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': algorithm, 'kid': 'k1'})}.{part({'sub': 'x'})}.c2ln"
    refused = await http.get("/v1/models", headers=bearer(token))
    assert refused.status_code == 401, refused.text
    challenge = refused.headers["www-authenticate"]
    assert challenge == 'Bearer error="invalid_token", error_description="algorithm not accepted"'
    message = refused.json()["error"]["message"]
    assert "is not accepted" in message and len(message) < 100


async def test_a_scope_claim_of_another_type_grants_no_scopes(
    http: httpx.AsyncClient, issuer: Issuer
) -> None:
    for roles in (7, {"tiffin-ops": True}, None):
        token = issuer.token(roles=roles)
        refused = await http.get("/v1/models", headers=bearer(token))
        assert refused.status_code == 403, refused.text


async def test_a_failed_jwks_fetch_is_503_and_old_keys_keep_working(
    make_runtime: MakeRuntime, issuer: Issuer
) -> None:
    runtime = make_runtime(*oidc_overrides(issuer), builtins=[ScriptedEngines()])
    verifier = runtime.auth.plugin.oidc
    assert verifier is not None
    verifier.clock = clock = FakeClock(1000.0)
    token = issuer.token(roles=["tiffin-users"])
    async with await http_client(runtime) as http:
        issuer.failing = True  # the first fetch fails: 503, also for the next requests
        for _ in range(2):
            down = await http.get("/v1/models", headers=bearer(token))
            assert down.status_code == 503 and down.json()["error"]["code"] == "jwks_unavailable"
        assert issuer.fetches == 1  # not one fetch per request
        issuer.failing = False
        clock.now += 10
        assert (await http.get("/v1/models", headers=bearer(token))).status_code == 200
        # The cache runs out and the refetch fails: the keys we had still verify.
        issuer.failing = True
        clock.now += verifier.config.jwks_cache_s
        assert (await http.get("/v1/models", headers=bearer(token))).status_code == 200
        assert issuer.fetches == 3
        issuer.keys["k2"] = new_rsa()  # a kid we could not fetch: 503, not 401
        rotated = issuer.token(kid="k2", roles=["tiffin-users"])
        clock.now += 10
        down = await http.get("/v1/models", headers=bearer(rotated))
        assert down.status_code == 503 and down.json()["error"]["code"] == "jwks_unavailable"
        issuer.failing = False
        clock.now += 10
        assert (await http.get("/v1/models", headers=bearer(rotated))).status_code == 200


async def test_a_subject_named_like_a_key_has_its_own_limits(
    make_runtime: MakeRuntime, issuer: Issuer
) -> None:
    overrides = [*oidc_overrides(issuer), KEYS, "auth.limits.requests_per_minute=1"]
    runtime = make_runtime(*overrides, builtins=[ScriptedEngines()])
    token = issuer.token(sub="app", roles=["tiffin-users"])  # the config key is named app too
    async with await http_client(runtime) as http:
        assert (await http.get("/v1/models", headers=bearer(token))).status_code == 200
        assert (await http.get("/v1/models", headers=APP)).status_code == 200  # its own bucket
        limited = await http.get("/v1/models", headers=bearer(token))
        assert limited.status_code == 429 and "oidc:app" in limited.json()["error"]["message"]


def test_scope_claims_as_strings_or_lists() -> None:
    verifier = OidcVerifier(
        OidcConfig(jwks_url="http://unused", scope_claim="scp", scope_map={"ops": ["admin"]}),
        RateLimitConfig(),
    )
    assert verifier.scopes({"scp": "inference openid ops"}) == {"inference", "admin"}
    assert verifier.scopes({"scp": ["inference"]}) == {"inference"}
    assert verifier.scopes({"scp": "root"}) == frozenset()
    assert verifier.scopes({}) == frozenset()
    assert verifier.scopes({"scp": 3}) == frozenset()  # not a 500
    assert verifier.scopes({"scp": [1, "inference"]}) == {"inference"}
