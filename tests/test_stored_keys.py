"""API keys stored in the database: the `keys` CLI through the real entry point, auth looking
them up by digest (cache, revocation within the TTL, per-key limits, 503 while the database is
down, config keys unaffected), `last_used_at` written in the background, and a stored key over
WebSocket. tests/test_database_postgres.py checks one on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from runtime.app import Runtime
from runtime.auth import hash_key, new_key
from runtime.auth.stored import StoredKeys
from runtime.cli.main import main
from runtime.config_schema import RateLimitConfig
from runtime.persistence import migrate
from runtime.persistence.api_keys import ApiKeyStore, StoredKey
from runtime.transports.http import create_app
from runtime.transports.proto.tiffin.v1 import inference_pb2 as pb
from runtime.transports.proto.tiffin.v1 import inference_pb2_grpc
from runtime.types import HandlerError
from tests.test_auth import ADMIN, APP_KEY, KEYS, FakeClock, log_stream
from tests.test_cli import run_cli
from tests.test_database import (
    database_of,
    database_overrides,
    start_with_models,
    unreachable_engine,
)
from tests.test_grpc import serve as serve_grpc
from tests.test_openai_api import ScriptedEngines, chat
from tests.test_ws import assert_error, send, turn
from tests.test_ws import serve as serve_ws

MakeRuntime = Callable[..., Runtime]
__all__ = ["log_stream"]  # the fixture, shared with tests/test_auth.py


def key_store(runtime: Runtime) -> ApiKeyStore:
    store = database_of(runtime).api_keys()
    assert store is not None
    return store


async def stored_key(store: ApiKeyStore, name: str, *scopes: str, **limits: int) -> str:
    key = new_key()
    await store.create(name, hash_key(key), scopes or ("inference",), **limits)
    return key


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def serve_http(runtime: Runtime) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://tiffin.test")


# --- the CLI ------------------------------------------------------------------------------------


def test_keys_cli_stores_lists_and_revokes_keys_in_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = ["integrations=database", f"integrations.database.settings.data_dir={tmp_path}"]
    # The real entry point for create and revoke; in-process (same code) for the rest.
    created = run_cli("keys", "create", "--scope", "admin", "--name", "ci", *database)
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[0]
    assert key.startswith("tk-") and "stored" in created.stdout
    assert "key_sha256" not in created.stdout  # nothing to paste into config
    limits = ["--requests-per-minute", "7"]
    assert main(["keys", "create", "--name", "bot", *limits, *database]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--name", "ci", *database]) == 1
    assert "already named 'ci'" in capsys.readouterr().err
    # Names that would share limits and usage rows with a config key or OIDC subjects.
    declared = "auth.keys=[{name:ops,key:'',scopes:[admin]}]"
    assert main(["keys", "create", "--name", "ops", declared, *database]) == 1
    assert "declared in config (auth.keys)" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "oidc:alice", *database]) == 1
    assert "OIDC" in capsys.readouterr().err

    assert main(["keys", "list", *database]) == 0
    listed = capsys.readouterr().out
    assert "auth: enforced" in listed
    [ci_line] = [line for line in listed.splitlines() if line.strip().startswith("ci ")]
    assert "scopes=admin" in ci_line and "active" in ci_line and "last_used=-" in ci_line
    assert f"sha256={hash_key(key)[:8]}…" in ci_line
    assert key not in listed and hash_key(key) not in listed

    revoked = run_cli("keys", "revoke", "ci", *database)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    assert main(["keys", "revoke", "ci", *database]) == 1  # nothing active left
    assert main(["keys", "list", *database]) == 0
    listed = capsys.readouterr().out
    assert "revoked=" in next(line for line in listed.splitlines() if line.startswith("  ci "))
    # A revoked key's name may be issued again.
    assert main(["keys", "create", "--name", "ci", *database]) == 0

    async def check() -> None:
        store = ApiKeyStore(create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'tiffin.db'}"))
        try:
            keys = await store.all()
        finally:
            await store.engine.dispose()
        assert [(k.name, k.active) for k in keys] == [("ci", False), ("bot", True), ("ci", True)]
        assert keys[1].requests_per_minute == 7 and keys[1].tokens_per_minute is None
        assert keys[0].digest == hash_key(key)

    asyncio.run(check())


def test_keys_cli_without_a_database_keeps_config_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://tiffin:pw@db.invalid/tiffin")
    assert main(["keys", "create", "--name", "ci"]) == 0
    created = capsys.readouterr()
    assert "key_sha256:" in created.out and "add integrations=database" in created.err
    assert "pw@" not in created.err
    assert main(["keys", "list"]) == 0
    assert "stored keys: none (select integrations=database" in capsys.readouterr().out
    assert main(["keys", "revoke", "ci"]) == 1
    assert "integrations=database" in capsys.readouterr().err


# --- auth ---------------------------------------------------------------------------------------


async def test_stored_keys_authenticate_and_revocation_takes_effect_within_the_ttl(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    overrides = [*database_overrides(tmp_path), "auth.required=true", "auth.cache_ttl_s=5"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    store = key_store(runtime)
    stored = runtime.auth.plugin.stored
    assert stored is not None
    stored.clock = clock = FakeClock(1000.0)
    admin = await stored_key(store, "ops", "admin")
    client = await stored_key(store, "app")
    async with await serve_http(runtime) as http:
        assert (await http.get("/v1/models", headers=bearer(client))).status_code == 200
        assert (await http.get("/admin/requests", headers={"x-api-key": admin})).status_code == 200
        forbidden = await http.get("/admin/requests", headers=bearer(client))
        assert forbidden.status_code == 403
        wrong = await http.get("/v1/models", headers=bearer("tk-unknown"))
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

        await store.revoke("app")
        clock.now += 4  # still cached: no database query per request
        assert (await http.get("/v1/models", headers=bearer(client))).status_code == 200
        clock.now += 2
        revoked = await http.get("/v1/models", headers=bearer(client))
        assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "invalid_api_key"

        # A negative answer is cached too: a key stored after it was refused waits for the TTL.
        late = new_key()
        assert (await http.get("/v1/models", headers=bearer(late))).status_code == 401
        await store.create("late", hash_key(late), ["inference"])
        assert (await http.get("/v1/models", headers=bearer(late))).status_code == 401
        clock.now += 6
        assert (await http.get("/v1/models", headers=bearer(late))).status_code == 200

    await stored.close()  # what stopping does: the background writes of last_used_at
    used = {key.name: key.last_used_at for key in await store.all()}
    assert used["ops"] is not None and used["late"] is not None


async def test_stored_keys_have_their_own_limits(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    overrides = [*database_overrides(tmp_path), "auth.limits.requests_per_minute=5"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    store = key_store(runtime)
    strict = await stored_key(store, "strict", requests_per_minute=1)
    default = await stored_key(store, "default")
    async with await serve_http(runtime) as http:
        assert (await http.get("/v1/models", headers=bearer(strict))).status_code == 200
        limited = await http.get("/v1/models", headers=bearer(strict))
        assert limited.status_code == 429 and "strict" in limited.json()["error"]["message"]
        for _ in range(5):
            assert (await http.get("/v1/models", headers=bearer(default))).status_code == 200
        assert (await http.get("/v1/models", headers=bearer(default))).status_code == 429


async def test_a_stored_key_turns_auth_on_without_auth_required(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    overrides = [*database_overrides(tmp_path), "auth.cache_ttl_s=0"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    async with await serve_http(runtime) as http:
        assert (await http.get("/v1/models")).status_code == 200  # dev-style: no keys, no auth
        key = await stored_key(key_store(runtime), "first")
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200


async def test_keyless_requests_get_503_until_the_database_first_answers(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    # Without auth.required, stored keys turn auth on; before the database has said whether it
    # holds any, a keyless request is refused (503), never served without a key.
    overrides = [*database_overrides(tmp_path), "auth.cache_ttl_s=0"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    key = await stored_key(key_store(runtime), "early")
    stored = runtime.auth.plugin.stored
    assert stored is not None
    stored.clock = clock = FakeClock(1000.0)
    database = database_of(runtime)
    working = database.store.engine
    database.store.engine = unreachable_engine(tmp_path)
    async with await serve_http(runtime) as http:
        try:
            refused = await http.get("/v1/models")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "key_store_unavailable"
            assert refused.headers["retry-after"] == "5"
            public = await http.get("/integrations/health")  # public routes still answer
            assert "key_store_unavailable" not in public.text and public.status_code != 401
        finally:
            await database.store.engine.dispose()
            database.store.engine = working
        assert (await http.get("/v1/models")).status_code == 503  # no retry for `retry_s`
        clock.now += stored.retry_s
        assert (await http.get("/v1/models")).status_code == 401  # it answered: keys exist
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200


async def test_database_down_config_keys_work_stored_keys_get_503(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    overrides = [*database_overrides(tmp_path), KEYS, "auth.cache_ttl_s=60"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    store = key_store(runtime)
    stored = runtime.auth.plugin.stored
    assert stored is not None
    stored.clock = clock = FakeClock(1000.0)
    cached = await stored_key(store, "cached")
    uncached = await stored_key(store, "uncached")
    database = database_of(runtime)
    async with await serve_http(runtime) as http:
        assert (await http.get("/v1/models", headers=bearer(cached))).status_code == 200
        working = database.store.engine
        database.store.engine = unreachable_engine(tmp_path)
        try:
            assert (await http.get("/v1/models", headers=ADMIN)).status_code == 200
            assert (await http.get("/v1/models", headers=bearer(cached))).status_code == 200
            down = await http.get("/v1/models", headers=bearer(uncached))
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            assert error["type"] == "service_unavailable"
            assert error["code"] == "key_store_unavailable"
            assert down.headers["retry-after"] == "5"
            assert uncached not in down.text and "unable to open" not in down.text
        finally:
            await database.store.engine.dispose()
            database.store.engine = working
        # For a second after a failure, answered without trying (no connect per request).
        assert (await http.get("/v1/models", headers=bearer(uncached))).status_code == 503
        clock.now += 1
        assert (await http.get("/v1/models", headers=bearer(uncached))).status_code == 200


class GatedStore(ApiKeyStore):
    """The real store, counting its queries and holding them until `gate` opens."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.counts = self.finds = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def count(self) -> int:
        self.counts += 1
        await self.gate.wait()
        return await super().count()

    async def find(self, digest: str) -> StoredKey | None:
        self.finds += 1
        await self.gate.wait()
        return await super().find(digest)


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[GatedStore]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}")
    await migrate.upgrade(engine)
    yield GatedStore(engine)
    await engine.dispose()


async def test_concurrent_requests_share_one_query(gated: GatedStore) -> None:
    key = await stored_key(gated, "shared")
    stored = StoredKeys(lambda: gated, RateLimitConfig(), ttl_s=5, clock=(clock := FakeClock(0)))
    gated.gate.clear()
    waiting = asyncio.gather(*(stored.any_issued() for _ in range(5)))
    looking = asyncio.gather(*(stored.lookup(key) for _ in range(5)))
    await asyncio.sleep(0.01)
    gated.gate.set()
    assert await waiting == [True] * 5  # none answered yet: all wait for the one count
    assert {p.name for p in await looking if p} == {"shared"}
    assert (gated.counts, gated.finds) == (1, 1)
    clock.now += 5  # stale: one refresh, the others answered from the old value meanwhile
    gated.gate.clear()
    refreshing = asyncio.gather(*(stored.any_issued() for _ in range(5)))
    await asyncio.sleep(0.01)
    assert gated.counts == 2
    gated.gate.set()
    assert await refreshing == [True] * 5
    await stored.close()


async def test_a_failed_count_is_not_retried_for_retry_s(tmp_path: Path) -> None:
    store = GatedStore(unreachable_engine(tmp_path))
    stored = StoredKeys(lambda: store, RateLimitConfig(), ttl_s=0, clock=(clock := FakeClock(0)))
    assert await stored.any_issued() is None  # never answered
    assert await stored.any_issued() is None
    assert store.counts == 1  # within retry_s: no connect attempt per request
    with pytest.raises(HandlerError) as down:
        await stored.lookup(new_key())
    assert down.value.status == 503 and store.finds == 0
    clock.now += stored.retry_s
    assert await stored.any_issued() is None and store.counts == 2
    await store.engine.dispose()


async def test_a_stored_key_over_websocket(make_runtime: MakeRuntime, tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'tiffin.db'}")
    try:
        await migrate.upgrade(engine)
        key = await stored_key(ApiKeyStore(engine), "socket")
    finally:
        await engine.dispose()
    async with serve_ws(
        make_runtime, *database_overrides(tmp_path), "auth.required=true"
    ) as served:
        (await served.engine()).enqueue(["Hi"])
        async with served.connect(f"/ws/chat?token={key}") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert (await turn(ws))[-1]["type"] == "done"
        async with served.connect(f"/ws/chat?token={APP_KEY}") as ws:
            await send(ws, {"message": "hi", "model": "m1"})
            assert_error((await turn(ws))[-1], "authentication_error", "invalid_api_key")


async def test_chat_with_a_stored_key_is_logged_under_its_name(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    runtime = await start_with_models(
        make_runtime(*database_overrides(tmp_path), builtins=[ScriptedEngines()])
    )
    key = await stored_key(key_store(runtime), "billing")
    async with await serve_http(runtime) as http:
        answer = await http.post("/v1/chat/completions", json=chat(model="m1"), headers=bearer(key))
        assert answer.status_code == 200, answer.text
        usage = (await http.get("/admin/usage", headers=bearer(key))).json()
    # An inference key cannot read usage; the principal is named in the log all the same.
    assert usage["error"]["code"] == "insufficient_scope"
    await database_of(runtime).writer.flush()
    [row] = await database_of(runtime).store.rows()
    assert row["key_name"] == "billing"


async def test_a_stored_key_over_grpc_and_503_while_the_database_is_down(
    make_runtime: MakeRuntime, tmp_path: Path
) -> None:
    overrides = [*database_overrides(tmp_path), "transports.grpc=true", "auth.required=true"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    key = await stored_key(key_store(runtime), "rpc")
    server, channel = await serve_grpc(runtime)
    database = database_of(runtime)
    try:
        stub = inference_pb2_grpc.InferenceStub(channel)
        answer = await stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", key),))
        assert {model.id for model in answer.data} == {"m1", "m2"}
        working = database.store.engine
        database.store.engine = unreachable_engine(tmp_path)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.ListModels(pb.ListModelsRequest(), metadata=(("x-api-key", new_key()),))
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await database.store.engine.dispose()
            database.store.engine = working
    finally:
        await channel.close()
        await server.stop()


async def test_a_stored_key_is_never_logged_shown_or_stored(
    make_runtime: MakeRuntime, tmp_path: Path, log_stream: io.StringIO
) -> None:
    runtime = await start_with_models(
        make_runtime(*database_overrides(tmp_path), builtins=[ScriptedEngines()])
    )
    key = await stored_key(key_store(runtime), "quiet", "admin")
    shown = []
    async with await serve_http(runtime) as http:
        await http.post("/v1/chat/completions", json=chat(model="m1"), headers=bearer(key))
        for path in ("/integrations/status", "/admin/requests", "/admin/usage"):
            shown.append((await http.get(path, headers=bearer(key))).text)
    await runtime.stop()
    database = (tmp_path / "tiffin.db").read_bytes()
    assert hash_key(key).encode() in database  # the digest, and nothing more
    for text in [log_stream.getvalue(), *shown]:
        assert key not in text
    assert key.encode() not in database and key[3:].encode() not in database


async def test_an_apply_of_auth_settings_keeps_the_stored_keys_with_the_new_defaults(
    make_runtime: MakeRuntime, compose_test: Callable[..., Any], tmp_path: Path
) -> None:
    overrides = [*database_overrides(tmp_path), "auth.limits.requests_per_minute=100"]
    runtime = await start_with_models(make_runtime(*overrides, builtins=[ScriptedEngines()]))
    key = await stored_key(key_store(runtime), "app")
    old = runtime.auth.plugin.stored
    async with await serve_http(runtime) as http:
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 200
        cfg = compose_test(*overrides[:-1], "auth.limits.requests_per_minute=1")
        answer = await runtime.reconfigure.apply(cfg)
        assert [c["kind"] for c in answer["changes"]] == ["auth"]
        assert runtime.auth.plugin.stored is not old  # the new default limit, for stored keys
        # Still known (not 401), and over its new limit: the count kept the request before.
        limited = await http.get("/v1/models", headers=bearer(key))
        assert limited.status_code == 429 and "app" in limited.json()["error"]["message"]
    await runtime.reconfigure.wait_retired()  # the old cache closed: its last writes made
    used = {stored.name: stored.last_used_at for stored in await key_store(runtime).all()}
    assert used["app"] is not None
