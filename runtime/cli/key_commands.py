"""`python -m runtime keys create|list|revoke [overrides...]`.

With the database integration in the composed config (`integrations=database`, its URL from
DATABASE_URL or SQLite under the data dir), `create` stores the key's SHA-256 and prints the
key once, `list` shows the stored keys beside the config's, and `revoke NAME` revokes a stored
key (running servers stop accepting it within `auth.cache_ttl_s`). Without it, `create` prints
the lines that declare the key in config, and `revoke` explains how to remove a config key.
Nothing here prints a digest in full or a key other than the one just made.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from runtime.app import to_settings
from runtime.auth.keys import SCOPES, hash_key, new_key
from runtime.auth.oidc import PREFIX as OIDC_PREFIX
from runtime.config import compose
from runtime.config_schema import TiffinConfig
from runtime.errors import ConfigError
from runtime.persistence import migrate
from runtime.persistence.api_keys import ApiKeyStore, KeyExists, StoredKey


def keys_main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime keys")
    verbs = parser.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="make a new key and print it once")
    create.add_argument("--name", required=True, help="who the key is for (logs, limits)")
    create.add_argument(
        "--scope",
        action="append",
        choices=sorted(SCOPES),
        help="a scope it grants (repeat for several; default inference)",
    )
    create.add_argument("--requests-per-minute", type=int, help="this key's limit (stored keys)")
    create.add_argument("--tokens-per-minute", type=int, help="this key's limit (stored keys)")
    listing = verbs.add_parser("list", help="the keys the config and the database hold")
    revoke = verbs.add_parser("revoke", help="revoke a stored key")
    revoke.add_argument("name")
    for verb in (create, listing, revoke):
        verb.add_argument(
            "overrides", nargs="*", help="Hydra overrides, e.g. integrations=database"
        )
    parsed = parser.parse_args(list(args))
    try:
        settings = to_settings(compose(parsed.overrides))
    except ConfigError as error:
        print(f"tiffin: config error: {error}", file=sys.stderr)
        return 2
    store = _store(settings)
    if parsed.verb == "create":
        clash = _name_clash(settings, parsed.name, stored=store is not None)
        if clash:
            print(f"tiffin: {clash}; choose another name", file=sys.stderr)
            return 1
        scopes = parsed.scope or ["inference"]
        if store is None:
            if os.environ.get("DATABASE_URL"):
                print(
                    "tiffin: DATABASE_URL is set but the database integration is not selected; "
                    "add integrations=database (as the server has) to store the key there",
                    file=sys.stderr,
                )
            return _create_config_key(parsed.name, scopes)
        limits = (parsed.requests_per_minute, parsed.tokens_per_minute)
        return asyncio.run(_create_stored(store, parsed.name, scopes, limits))
    if parsed.verb == "list":
        return asyncio.run(_list(settings, store))
    return asyncio.run(_revoke(settings, store, parsed.name))


def _name_clash(settings: TiffinConfig, name: str, *, stored: bool) -> str:
    """Why `name` cannot be a new key's: principals share rate limits and usage rows by name,
    so a stored key must not take a config key's name (in any env: one left empty here may be
    set there), nor any key the `oidc:` prefix of token subjects. "" when it can."""
    if name.startswith(OIDC_PREFIX):
        return f"{OIDC_PREFIX!r} names the subjects of OIDC tokens"
    if stored and any(declared.name == name for declared in settings.auth.keys):
        return f"a key named {name!r} is declared in config (auth.keys)"
    return ""


def _store(settings: TiffinConfig) -> ApiKeyStore | None:
    """The database's key table, when the config selects the database integration."""
    from runtime.integrations.database import Target  # the CLI only: not on the auth path

    database = settings.integrations.get("database")
    if database is None or not database.enabled:
        return None
    target = Target(database.settings)
    target.prepare()
    return ApiKeyStore(target.engine())


async def _create_stored(
    store: ApiKeyStore, name: str, scopes: list[str], limits: tuple[int | None, int | None]
) -> int:
    key = new_key()
    try:
        await migrate.upgrade(store.engine)
        await store.create(
            name, hash_key(key), scopes, requests_per_minute=limits[0], tokens_per_minute=limits[1]
        )
    except KeyExists as exc:
        print(f"tiffin: {exc}; revoke it first or choose another name", file=sys.stderr)
        return 1
    finally:
        await store.engine.dispose()
    print(f"{key}\n")
    print(f"Shown once: the database keeps only its SHA-256. Key {name!r} is stored with scopes")
    print(f"{', '.join(dict.fromkeys(scopes))}; send it as `Authorization: Bearer <key>`.")
    return 0


def _create_config_key(name: str, scopes: list[str]) -> int:
    key = new_key()
    variable = "TIFFIN_KEY_" + re.sub(r"[^A-Za-z0-9]+", "_", name).upper()
    scope_list = ", ".join(dict.fromkeys(scopes))
    print(f"{key}\n")
    print("Shown once: Tiffin keeps only its SHA-256. Put it in use with")
    print(f"  export {variable}={key}")
    print("and this entry in auth.keys (conf/env/<env>.yaml or your own layer):")
    print(f"  - {{name: {name}, key: \"${{oc.env:{variable},''}}\", scopes: [{scope_list}]}}")
    print("or, to hold no secret in the environment either:")
    print(f"  - {{name: {name}, key_sha256: {hash_key(key)}, scopes: [{scope_list}]}}")
    print("(with integrations=database, `keys create` stores the key in the database instead)")
    return 0


def _when(at: float | None) -> str:
    return "-" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _stored_keys(store: ApiKeyStore) -> list[StoredKey]:
    try:
        await migrate.upgrade(store.engine)
        return await store.all()
    finally:
        await store.engine.dispose()


async def _list(settings: TiffinConfig, store: ApiKeyStore | None) -> int:
    auth = settings.auth
    stored = await _stored_keys(store) if store is not None else []
    enforced = auth.required or any(k.key or k.key_sha256 for k in auth.keys) or bool(stored)
    print(f"auth: {'enforced' if enforced else 'off'} (required={str(auth.required).lower()})")
    print("config keys:" if auth.keys else "config keys: none")
    for declared in auth.keys:
        state = "set" if declared.key or declared.key_sha256 else "unset (not offered)"
        print(f"  {declared.name}  scopes={','.join(declared.scopes)}  {state}")
    if store is None:
        print("stored keys: none (select integrations=database to store keys)")
        return 0
    print("stored keys:" if stored else "stored keys: none")
    for key in stored:
        state = "active" if key.active else f"revoked={_when(key.revoked_at)}"
        print(
            f"  {key.name}  scopes={','.join(key.scopes)}  sha256={key.digest[:8]}…  "
            f"created={_when(key.created_at)}  last_used={_when(key.last_used_at)}  {state}"
        )
    return 0


async def _revoke(settings: TiffinConfig, store: ApiKeyStore | None, name: str) -> int:
    if store is not None:
        try:
            await migrate.upgrade(store.engine)
            revoked = await store.revoke(name)
        finally:
            await store.engine.dispose()
        if revoked:
            ttl = settings.auth.cache_ttl_s
            print(f"tiffin: key {name!r} revoked; running servers refuse it within {ttl:g} s")
            return 0
    if any(declared.name == name for declared in settings.auth.keys):
        print(
            f"tiffin: key {name!r} is declared in config: remove it from auth.keys or unset "
            "its environment variable and restart (keys stored with integrations=database are "
            "revoked at run time).",
            file=sys.stderr,
        )
        return 1
    where = "in the database or the config" if store is not None else "in the config"
    hint = "" if store is not None else " (stored keys need integrations=database)"
    print(f"tiffin: no active key named {name!r} {where}{hint}", file=sys.stderr)
    return 1
