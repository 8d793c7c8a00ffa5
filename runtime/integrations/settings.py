"""Typed settings of integrations: each integration module declares a dataclass of its
`settings` (its fields, their types and defaults) beside the integration, names it as the
class's `settings_schema`, and derives its `DEFAULT_*_CONFIG` settings from it with
`defaults_of`, so the defaults live in one place (the YAML in conf/integrations/ repeats them,
and tests/test_settings.py holds the two together).

`check_settings` is what the registry runs before it builds an integration: an unknown setting
(with the closest known name), a value of the wrong type, or a required one left out is a
ConfigError naming the key, the value and what was expected, before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, cast

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.errors import ConfigError
from runtime.secrets import MASK, is_secret_key

# Longer values are cut in error messages: a line names the value, it does not reprint it.
SHOWN_CHARS = 60


def defaults_of(schema: type[Any]) -> dict[str, Any]:
    """The schema's defaults as a plain dict (what `DEFAULT_*_CONFIG.settings` holds). A
    required field (no default) is left out."""
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if not _required(f):
            value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            defaults[f.name] = _plain(value)
    return defaults


def check_settings(schema: type[Any], raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    """`raw` checked against `schema` and converted to its types, defaults filled in.

    `key` is where the settings sit (`integrations.ollama.settings`), for the error message.
    Raises ConfigError for an unknown setting, a wrong type or a missing required one."""
    _check_keys(schema, raw, key)
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), dict(raw))
    except OmegaConfBaseException as exc:
        path = str(getattr(exc, "full_key", "") or "")
        raise _type_error(schema, raw, key, path) from None
    for path in _missing(schema, raw):
        expected = _describe(_field_type(schema, path))
        raise ConfigError(f"{key}.{path}", _Nothing(), f"{expected} (required: it has no default)")
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


class _Nothing:
    """Stands for a setting that was not given at all (`got nothing`)."""

    def __repr__(self) -> str:
        return "nothing"


def _check_keys(schema: type[Any], raw: Mapping[str, Any], key: str) -> None:
    hints = typing.get_type_hints(schema)
    for name, value in raw.items():
        if name not in hints:
            known = sorted(hints)
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{key}.{name}",
                _shown(str(name), value),
                f"one of: {', '.join(known)}{hint}",
            )
        inner = hints[name]
        if dataclasses.is_dataclass(inner):
            if not isinstance(value, Mapping):  # OmegaConf's error would not name the key
                raise ConfigError(f"{key}.{name}", _shown(str(name), value), _describe(inner))
            _check_keys(cast(type[Any], inner), value, f"{key}.{name}")


def _type_error(schema: type[Any], raw: Mapping[str, Any], key: str, path: str) -> ConfigError:
    value: Any = raw
    for part in path.split(".") if path else []:
        value = value.get(part) if isinstance(value, Mapping) else None
    name = path.rsplit(".", 1)[-1]
    field_type = _field_type(schema, path) if path else schema
    where = f"{key}.{path}" if path else key
    return ConfigError(where, _shown(name, value), _describe(field_type))


def _missing(schema: type[Any], raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    found: list[str] = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = raw.get(f.name, MISSING) if isinstance(raw, Mapping) else MISSING
        if _required(f) and value == MISSING:
            found.append(f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            inner = value if isinstance(value, Mapping) else {}
            found += _missing(cast(type[Any], hints[f.name]), inner, f"{prefix}{f.name}.")
    return found


def _required(f: dataclasses.Field[Any]) -> bool:
    """No default at all, or OmegaConf's MISSING (`???`)."""
    no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    return no_default or f.default == MISSING


def _field_type(schema: type[Any], path: str) -> Any:
    current: Any = schema
    for part in path.split("."):
        if not dataclasses.is_dataclass(current):
            return Any
        current = typing.get_type_hints(current).get(part.split("[", 1)[0], Any)
    return current


def _describe(annotation: Any) -> str:
    """What a value of this type looks like, in words."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return " or ".join(_describe(a) for a in options) + " (or null)"
    if origin is list:
        return "a list"
    if origin is dict or annotation is dict:
        return "a mapping of names to values"
    if dataclasses.is_dataclass(annotation):
        names = ", ".join(f.name for f in dataclasses.fields(annotation))
        return f"a mapping with the keys {names}"
    words = {
        float: "a number (float)",
        int: "a whole number (int)",
        bool: "true or false (bool)",
        str: "a string",
    }
    return words.get(annotation, "a value of any type")


def _shown(name: str, value: Any) -> Any:
    """`value` as an error message may show it: masked under a secret's name, cut when long."""
    if is_secret_key(name) and value not in (None, ""):
        return MASK
    text = value if isinstance(value, str) else None
    if text is not None and len(text) > SHOWN_CHARS:
        return f"{text[: SHOWN_CHARS - 3]}..."
    if text is None and len(repr(value)) > SHOWN_CHARS:
        return f"{repr(value)[: SHOWN_CHARS - 3]}..."
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
