"""`python -m runtime keys create|list|revoke`.

Keys are declared in config (normally from environment variables), so `create` makes a key,
prints it once with the lines that put it in use, and stores nothing; `list` shows the keys
the composed config declares (names, scopes, whether set: never a key); `revoke` explains how
to remove a config key. Stored keys, listed and revoked at run time, need the database that a
later part of issue 8 adds.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from runtime.app import to_settings
from runtime.auth.keys import SCOPES, hash_key, new_key
from runtime.config import compose
from runtime.errors import ConfigError


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
    listing = verbs.add_parser("list", help="the keys the config declares (no secrets)")
    listing.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. env=prod")
    revoke = verbs.add_parser("revoke", help="how to revoke a key")
    revoke.add_argument("name")
    parsed = parser.parse_args(list(args))
    if parsed.verb == "create":
        return _create(parsed.name, parsed.scope or ["inference"])
    if parsed.verb == "list":
        return _list(parsed.overrides)
    print(
        f"tiffin: key {parsed.name!r} is declared in config: remove it from auth.keys or unset "
        "its environment variable and restart. Revoking stored keys at run time needs the "
        "database (issue 8).",
        file=sys.stderr,
    )
    return 1


def _create(name: str, scopes: list[str]) -> int:
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
    return 0


def _list(overrides: Sequence[str]) -> int:
    try:
        settings = to_settings(compose(overrides))
    except ConfigError as error:
        print(f"tiffin: config error: {error}", file=sys.stderr)
        return 2
    auth = settings.auth
    enforced = auth.required or any(k.key or k.key_sha256 for k in auth.keys)
    print(f"auth: {'enforced' if enforced else 'off'} (required={str(auth.required).lower()})")
    for declared in auth.keys:
        state = "set" if declared.key or declared.key_sha256 else "unset (not offered)"
        print(f"  {declared.name}  scopes={','.join(declared.scopes)}  {state}")
    return 0
