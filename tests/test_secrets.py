"""Redaction of secrets in values, mappings and free text."""

from __future__ import annotations

import pytest

from runtime.secrets import MASK, is_secret_key, redact, redact_text


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "apiKey",
        "token",
        "HUGGINGFACE_TOKEN",
        "hf_token",
        "access_token",
        "password",
        "db_password",
        "client_secret",
        "authorization",
        "private_key",
        "dsn",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "base_url",
        "timeout",
        "name",
        "keywords",
        "monkey",
        "author",
        # Counts of tokens and the tokenizer's path are not credentials: `--cfg job` and the
        # status endpoints show them.
        "max_tokens",
        "tokens_per_minute",
        "tokenizer",
    ],
)
def test_plain_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_nested_values_are_masked_and_copies_returned() -> None:
    settings = {
        "api_key": "sk-1",
        "base_url": "postgresql://u:pw@h:5432/db",
        "empty_token": "",
        "nested": [{"password": "x", "port": 5432}],
        "enabled": True,
    }
    masked = redact(settings)
    assert masked == {
        "api_key": MASK,
        "base_url": "postgresql://u:***@h:5432/db",
        "empty_token": "",
        "nested": [{"password": MASK, "port": 5432}],
        "enabled": True,
    }
    assert settings["api_key"] == "sk-1"


def test_free_text() -> None:
    text = "failed: POST https://x:y@h/v1 with Authorization: Bearer abc123 and token=zzz"
    assert redact_text(text) == (
        "failed: POST https://x:***@h/v1 with Authorization: Bearer *** and token=***"
    )
