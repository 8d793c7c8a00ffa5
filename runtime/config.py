"""The one place that composes `conf/`: `compose()` is what the CLI, the BentoML service and
the tests call. The schema it checks every layer against is in runtime/config_schema.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.config_errors import config_error
from runtime.config_schema import TiffinConfig
from runtime.errors import ConfigError
from runtime.graph import close_dependencies, start_order

CONFIG_MODULE = "conf"
CONFIG_NAME = "config"
INTEGRATIONS = "integrations"


def register_schema(store: ConfigStore | None = None) -> None:
    """Store the schema under the name `schema` that `conf/config.yaml` lists first."""
    store = store or ConfigStore.instance()
    store.store(name="schema", node=TiffinConfig)


# --- composition -------------------------------------------------------------------------------


@contextmanager
def _hydra() -> Iterator[None]:
    """Use the caller's Hydra context if there is one (tests), else open one on `conf`."""
    register_schema()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(CONFIG_MODULE, version_base=None):
        yield


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `conf/` with command-line style overrides into one validated config.

    The `integrations` group is multi-select: `integrations=a,b`, `integrations=[a,b]`,
    `+integrations=c` and `~integrations=c` are folded into one selection, which is then closed
    over its dependencies (pulled-in ones get `because`) and checked for cycles.
    Raises ConfigError for anything that would not run.
    """
    with _hydra():
        other, selection = _split_selection(overrides, _default_selection)
        searchpath = [o for o in other if o.startswith("hydra.")]
        available = group_options(INTEGRATIONS, searchpath)
        loaded: dict[str, DictConfig] = {}

        def dependencies_of(name: str) -> list[str] | None:
            if name not in available:
                return None
            if name not in loaded:
                # Only this integration is composed, so drop overrides aimed at the others.
                own = [o for o in other if not _targets_other_integration(o, name)]
                loaded[name] = _compose([*own, f"{INTEGRATIONS}=[{name}]"])[INTEGRATIONS][name]
            return list(loaded[name].dependencies)

        for name in selection:
            if name not in available:
                raise ConfigError(INTEGRATIONS, name, f"one of: {', '.join(available) or '(none)'}")
        because = close_dependencies(selection, dependencies_of)
        _refuse_unselected(other, list(because))
        cfg = _compose([*other, f"{INTEGRATIONS}=[{','.join(because)}]"])
    _validate_integrations(cfg, because)
    return cfg


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group (e.g. the integrations one can select)."""
    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        return sorted(
            loader.get_group_options(group, config_name=CONFIG_NAME, overrides=list(overrides))
        )


def config_groups() -> dict[str, list[str]]:
    """Every user-facing config group and its options, for `--help`."""
    with _hydra():
        loader = GlobalHydra.instance().config_loader()
        groups = [g for g in loader.list_groups("") if g not in ("hydra", "schema")]
        return {g: group_options(g) for g in sorted(groups)}


def load_config_file(path: str | Path) -> DictConfig:
    """Load a resolved config written by the CLI (`TIFFIN_CONFIG`) and validate it again."""
    try:
        loaded = OmegaConf.load(path)
        cfg = OmegaConf.merge(OmegaConf.structured(TiffinConfig), loaded)
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None
    return cast(DictConfig, cfg)


def config_from_data(data: object) -> DictConfig:
    """A composed config sent as data (`POST /admin/config`: what `compose()` returned, as a
    container, `${oc.env:...}` references unresolved), checked against the schema and the
    integrations' dependencies as `compose()` checks them. Raises ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError("config", type(data).__name__, "a mapping: a composed config")
    try:
        cfg = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(TiffinConfig), data))
        integrations = cfg[INTEGRATIONS]
        for name in integrations:
            for dep in integrations[name].dependencies:
                if dep not in integrations:
                    raise ConfigError(
                        f"{INTEGRATIONS}.{name}.dependencies", dep, "a configured integration"
                    )
        _validate_integrations(cfg, {n: integrations[n].because for n in integrations})
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None
    return cfg


def _split_selection(
    overrides: Sequence[str], defaults: Callable[[list[str]], list[str]]
) -> tuple[list[str], list[str]]:
    """Separate overrides of the integrations group from the rest and fold them into a list.

    The fold starts from the config's default selection (`defaults(other_overrides)`), unless
    the first integrations override replaces it (`integrations=...`)."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(
            "overrides", " ".join(overrides), f"key=value overrides ({str(exc).splitlines()[0]})"
        ) from None
    other: list[str] = []
    mine: list[tuple[str, Override]] = []
    for text, override in zip(overrides, parsed, strict=True):
        if override.key_or_group == INTEGRATIONS and override.package is None:
            mine.append((text, override))
        else:
            other.append(text)
    replaces = bool(mine) and not (
        mine[0][1].is_add() or mine[0][1].is_force_add() or mine[0][1].is_delete()
    )
    selection: list[str] = [] if replaces else defaults(other)
    for _, override in mine:
        names = _names(override)
        if override.is_delete():
            selection = [n for n in selection if names and n not in names]
        elif override.is_add() or override.is_force_add():
            selection += [n for n in names if n not in selection]
        else:
            selection = list(dict.fromkeys(names))
    return other, selection


def _default_selection(overrides: list[str]) -> list[str]:
    """The integrations config.yaml selects, composed without overrides of integration keys
    (which may name integrations the defaults do not include)."""
    rest = [o for o in overrides if not _targets_other_integration(o, "")]
    return list(_compose(rest)[INTEGRATIONS])


def _refuse_unselected(overrides: Sequence[str], selected: list[str]) -> None:
    """An override of an integration's key (`integrations.ollama.settings.timeout=...`) needs
    that integration selected; say so rather than Hydra's "not in the config"."""
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        parts = key.split(".")
        if parts[0] == INTEGRATIONS and len(parts) > 1 and parts[1] not in selected:
            raise ConfigError(
                key,
                parts[1],
                f"a selected integration (selected: {', '.join(selected) or 'none'}); "
                f"select it with +{INTEGRATIONS}={parts[1]}",
            )


def _targets_other_integration(override: str, name: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key.startswith(f"{INTEGRATIONS}.") and not key.startswith(f"{INTEGRATIONS}.{name}.")


def _names(override: Override) -> list[str]:
    value = override.value()
    if value is None:
        return []
    if isinstance(value, ChoiceSweep):
        value = value.list
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        raise ConfigError(
            INTEGRATIONS, value, "integration names, e.g. integrations=ollama,grafana"
        )
    return [str(v).strip() for v in value if str(v).strip()]


def _compose(overrides: Sequence[str]) -> DictConfig:
    try:
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except MissingConfigException as exc:
        raise _missing_option_error(exc, overrides) from None
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise config_error(cause) from None
        raise ConfigError("overrides", " ".join(overrides), str(exc).splitlines()[0]) from None
    except OmegaConfBaseException as exc:
        raise config_error(exc) from None


def _missing_option_error(exc: MissingConfigException, overrides: Sequence[str]) -> ConfigError:
    missing = exc.missing_cfg_file or ""
    if "/" not in missing:
        return ConfigError("config", missing, str(exc).splitlines()[0])
    group, option = missing.rsplit("/", 1)
    searchpath = [o for o in overrides if o.startswith("hydra.")]
    options = group_options(group, searchpath)
    return ConfigError(group, option, f"one of: {', '.join(options) or '(none)'}")


def _validate_integrations(cfg: DictConfig, because: dict[str, str | None]) -> None:
    integrations = cfg[INTEGRATIONS]
    for name, reason in because.items():
        node = integrations[name]
        if node.name != name:
            raise ConfigError(f"integrations.{name}.name", node.name, f"{name!r} (its file name)")
        node.because = reason
        for dep in node.dependencies:
            if node.enabled and not integrations[dep].enabled:
                raise ConfigError(
                    f"integrations.{name}.dependencies", dep, "an integration with enabled=true"
                )
    start_order(
        {n: list(integrations[n].dependencies) for n in because},
        {n: int(integrations[n].priority) for n in because},
    )
