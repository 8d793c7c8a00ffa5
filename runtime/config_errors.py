"""OmegaConf's validation errors as Tiffin's one-line ConfigError: the key, the value and what
was expected, with the close key where a typo names one that is not there."""

from __future__ import annotations

import difflib
import re

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from runtime.errors import ConfigError

_CONVERT = re.compile(
    r"Value '(?P<value>.*?)' (?:of type '.*' )?could not be converted to (?P<type>\w+)"
)
_ENUM = re.compile(r"Invalid value '(?P<value>.*)', expected one of (?P<options>\[.*\])")
_KEY = re.compile(r"Key '(?P<value>.*?)' (?:is )?not in '?(?P<type>\w+)'?")


def config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = str(getattr(exc, "full_key", None) or "config")
    message = str(getattr(exc, "msg", exc)).splitlines()[0]
    if m := _CONVERT.search(message):
        return ConfigError(key, m["value"], f"a value of type {m['type']}")
    if m := _ENUM.search(message):
        # IntegrationType has upper-case aliases for the platform guide; list each value once.
        options = dict.fromkeys(o.strip().lower() for o in m["options"].strip("[]").split(","))
        return ConfigError(key, m["value"], f"one of: {', '.join(options)}")
    if m := _KEY.search(message):
        where = "the config" if m["type"] == "struct" else m["type"]
        # A typo of a key that is there (`settings.timout`) gets the key it was meant to be.
        parent = getattr(exc, "parent_node", None)
        known = [str(k) for k in parent] if isinstance(parent, DictConfig) else []
        if close := difflib.get_close_matches(m["value"], known, n=1):
            return ConfigError(
                key, m["value"], f"a key that {where} defines; did you mean {close[0]!r}?"
            )
        return ConfigError(key, m["value"], f"a key that {where} defines (add one with +{key}=...)")
    return ConfigError(key, message, "a value the schema accepts")
