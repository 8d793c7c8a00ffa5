"""`python -m runtime build`'s own logic; the builds themselves are tests/test_bento.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from runtime.bake import BAKED_DIR
from runtime.cli.build import build_main, built_tag, with_env
from tests.conftest import ROOT


def test_an_invalid_config_builds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main(["integrations=no_such_integration"]) == 2
    assert "config error" in capsys.readouterr().err
    assert not BAKED_DIR.exists()


def test_the_tag_is_read_from_bentomls_tag_output() -> None:
    assert built_tag("some log\n__tag__:tiffin-gpu:abc123\n") == "tiffin-gpu:abc123"
    with pytest.raises(RuntimeError, match="__tag__"):
        built_tag("no tag here")


def test_the_images_tiffin_env_is_the_baked_env() -> None:
    options = yaml.safe_load(with_env(ROOT / "bentofile.gpu.yaml", "staging"))
    original = yaml.safe_load((ROOT / "bentofile.gpu.yaml").read_text())
    assert options["envs"][0] == {"name": "TIFFIN_ENV", "value": "staging"}
    assert [e for e in options["envs"] if e["name"] != "TIFFIN_ENV"] == [
        e for e in original["envs"] if e["name"] != "TIFFIN_ENV"
    ]
    assert {k: v for k, v in options.items() if k != "envs"} == {
        k: v for k, v in original.items() if k != "envs"
    }


def test_a_baked_config_left_behind_stops_the_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("runtime.cli.build.BAKED_DIR", tmp_path)
    (tmp_path / "config.yaml").write_text("env: dev\n")
    assert build_main(["env=prod"]) == 1
    assert "killed one left it" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "env: dev\n"


def test_help_says_what_build_does(capsys: pytest.CaptureFixture[str]) -> None:
    assert build_main(["--help"]) == 0
    assert "usage: python -m runtime build [--gpu]" in capsys.readouterr().out
