"""The config a Bento serves, baked in at build time.

`python -m runtime build` writes the composed config and the overrides it came from into
`bentos/baked/` before `bentoml build` packages it, so a container serves exactly what `plan`
showed for those overrides. The YAML is unresolved: `${oc.env:...}` values stay references that
the container resolves from its own environment, so no secret of the build machine is written.

In the container, `TIFFIN_OVERRIDES` (space-separated Hydra overrides) applies on top: the
config is composed again from the baked overrides followed by those, from the same `conf/` the
Bento packages (an override of a key the build also set replaces the build's). `TIFFIN_ENV`,
which the build sets to the baked env in the image, switches env when set to another one.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runtime.config import INTEGRATIONS, compose, load_config_file

BAKED_DIR = Path(__file__).resolve().parent.parent / "bentos" / "baked"
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.json"
PLAN_FILE = "plan.json"


def bake(
    cfg: DictConfig, overrides: Sequence[str], plan: Mapping[str, object], into: Path = BAKED_DIR
) -> Path:
    """Write `cfg` (unresolved), the overrides that composed it and its plan into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    (into / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    (into / OVERRIDES_FILE).write_text(json.dumps(list(overrides)) + "\n")
    (into / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return into


def unbake(into: Path = BAKED_DIR) -> None:
    """Remove what `bake` wrote, so a later plain `bentoml build` packages no stale config."""
    for name in (CONFIG_FILE, OVERRIDES_FILE, PLAN_FILE):
        (into / name).unlink(missing_ok=True)
    if into.is_dir() and not any(into.iterdir()):
        into.rmdir()


def is_baked(into: Path = BAKED_DIR) -> bool:
    return (into / CONFIG_FILE).is_file()


def load_baked(
    extra_overrides: str = "", *, env: str | None = None, into: Path = BAKED_DIR
) -> DictConfig:
    """The baked config, with `extra_overrides` (TIFFIN_OVERRIDES' syntax) applied on top, and
    `env` (TIFFIN_ENV) where it names another env than the baked one (the build sets the
    image's TIFFIN_ENV to the baked env, so only an operator's own value differs)."""
    cfg = load_config_file(into / CONFIG_FILE)
    extra = shlex.split(extra_overrides)
    if env and env != cfg.env:
        extra.insert(0, f"env={env}")
    if not extra:
        return cfg
    baked = json.loads((into / OVERRIDES_FILE).read_text())
    return compose(merge_overrides(baked, extra))


def merge_overrides(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    """`base` then `extra`, dropping a `base` override whose key `extra` sets again (Hydra
    rejects a key given twice). Integration selections are kept in order: `compose` folds
    `integrations=...`, `+integrations=...` and `~integrations=...` into one selection."""
    replaced = {_key(o) for o in extra if _key(o) != INTEGRATIONS}
    return [*(o for o in base if _key(o) not in replaced), *extra]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]
