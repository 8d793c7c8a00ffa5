"""docs/configuration.md is generated from the schema (runtime/cli/config_docs.py) and kept
current."""

from __future__ import annotations

import dataclasses

from runtime import config_schema as config
from runtime.cli.config_docs import DOC_FILE, field_comments, main, render


def test_the_configuration_reference_is_current() -> None:
    assert DOC_FILE.read_text() == render(), "stale: run `python -m runtime.cli.config_docs`"
    assert main(["--check"]) == 0


def test_every_schema_key_is_documented_with_a_description_where_commented() -> None:
    text = render()
    for prefix, cls in [
        ("server.", config.ServerConfig),
        ("serving.", config.ServingConfig),
        ("logging.", config.LoggingConfig),
        ("integrations.<name>.", config.IntegrationConfig),
        ("integrations.custom_models.settings.models[].", config.ModelConfig),
    ]:
        for item in dataclasses.fields(cls):
            assert f"| `{prefix}{item.name}` |" in text, prefix + item.name
    assert "| `server.http_port` | int | `3000` | HTTP: OpenAI API" in text
    assert '| `logging.format` | `console` \\| `json` | `"console"` |' in text
    assert "| `auth.keys[].name` | str | required |" in text


def test_a_comment_block_describes_the_fields_below_it() -> None:
    source = """
class A:
    # Shared by both.
    first: int = 1
    second: int = 2

    third: int = 3  # its own
    fourth: int = 4
"""
    assert field_comments(source)["A"] == {
        "first": "Shared by both.",
        "second": "Shared by both.",
        "third": "its own",
        "fourth": "",
    }
