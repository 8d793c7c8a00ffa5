"""`python -m runtime build`'s own logic; the builds themselves are tests/test_bento.py's."""

from __future__ import annotations

import pytest

from runtime.bake import BAKED_DIR
from runtime.build import build_main, built_tag


def test_an_invalid_config_builds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main(["integrations=no_such_integration"]) == 2
    assert "config error" in capsys.readouterr().err
    assert not BAKED_DIR.exists()


def test_the_tag_is_read_from_bentomls_tag_output() -> None:
    assert built_tag("some log\n__tag__:tiffin-gpu:abc123\n") == "tiffin-gpu:abc123"
    with pytest.raises(RuntimeError, match="__tag__"):
        built_tag("no tag here")
