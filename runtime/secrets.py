"""Redaction of secrets before anything is printed, logged or served.

A value is secret when its key names one (token, key, secret, password, credential, auth...), and
any URL loses the password in its user-info part. Used by `--cfg job`, the status endpoints,
integration errors and the log processor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_KEY = re.compile(
    r"(token(?![a-z])|secret|password|passwd|pwd|credential|api[_-]?key|private[_-]?key|"
    r"access[_-]?key|auth(orization)?$|cookie|^key$|_key$|dsn)",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://user:***@host
_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@"
)
# Bearer tokens and obvious key material inside free text.
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_KEY_IN_TEXT = re.compile(r"(?i)\b(api[_-]?key|token|password|secret)(\s*[=:]\s*)([^\s,;&]+)")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """Mask credentials inside a free-text string (URLs, bearer tokens, key=value)."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _BEARER.sub(lambda m: f"{m[1]}{MASK}", text)
    return _KEY_IN_TEXT.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)


def redact(value: Any, key: str = "") -> Any:
    """Return a copy of `value` with secrets masked; mappings and lists are walked."""
    if (
        key
        and is_secret_key(key)
        and value not in (None, "", [], {})
        and not isinstance(value, Mapping | list | tuple | bool)
    ):
        return MASK
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value
