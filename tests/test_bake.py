"""The config a Bento bakes (runtime/bake.py): written unresolved, read back as composed, and
`TIFFIN_OVERRIDES` applied on top in the container."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runtime.bake import bake, is_baked, load_baked, merge_overrides, unbake
from runtime.config import compose

SECRET = "sk-only-in-the-environment"
OVERRIDES = ["env=prod", "integrations=ollama", "server.http_port=3100"]


@pytest.fixture
def baked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TIFFIN_ADMIN_KEY", SECRET)
    cfg = compose(OVERRIDES)
    return bake(cfg, OVERRIDES, {"env": "prod"}, into=tmp_path / "baked")


def test_the_baked_config_keeps_environment_references_not_their_values(baked: Path) -> None:
    text = (baked / "config.yaml").read_text()
    assert SECRET not in text
    assert "${oc.env:TIFFIN_ADMIN_KEY,''}" in text
    assert json.loads((baked / "overrides.json").read_text()) == OVERRIDES
    assert is_baked(baked)


def test_loading_the_baked_config_gives_what_was_composed(baked: Path) -> None:
    loaded = load_baked("", into=baked)
    expected = compose(OVERRIDES)
    assert OmegaConf.to_container(loaded) == OmegaConf.to_container(expected)
    # Resolved in the container, from the container's environment.
    assert loaded.auth["keys"][0].key == SECRET


def test_tiffin_overrides_apply_on_top_of_the_baked_config(baked: Path) -> None:
    loaded = load_baked(
        "server.http_port=9100 logging.level=DEBUG +integrations=prometheus", into=baked
    )
    assert loaded.server.http_port == 9100
    assert loaded.logging.level == "DEBUG"
    assert loaded.env == "prod"  # from the build
    assert {"ollama", "prometheus"} <= set(loaded.integrations)
    assert load_baked("env=staging", into=baked).env == "staging"


def test_a_runtime_override_replaces_the_builds_override_of_the_same_key() -> None:
    base = ["env=prod", "integrations=ollama", "server.http_port=3100"]
    extra = ["server.http_port=9100", "+integrations=grafana", "env=staging"]
    assert merge_overrides(base, extra) == [
        "integrations=ollama",
        "server.http_port=9100",
        "+integrations=grafana",
        "env=staging",
    ]


def test_unbake_removes_the_files(baked: Path) -> None:
    unbake(baked)
    assert not baked.exists()
    assert not is_baked(baked)


def test_tiffin_env_switches_env_only_when_it_names_another(baked: Path) -> None:
    assert load_baked("", env="prod", into=baked).env == "prod"
    staging = load_baked("server.workers=3", env="staging", into=baked)
    assert staging.env == "staging" and staging.server.workers == 3
    assert "ollama" in staging.integrations  # the rest of the build's overrides still apply
