"""huggingface_hub: models from the Hugging Face Hub (or a mirror at `endpoint`), downloaded into
the library's standard cache and served by Tiffin's own engines.

The platform guide's calls work as written: `await hf.search_models("llama", limit=10)`,
`await hf.get_model_info(id)`, `await hf.download_model(id, allow_patterns=[...])`. `pull("hf://
org/repo[/file.gguf]")` downloads and makes the model servable: every repo in the cache is offered
by `models()`, and a pull announces `models.changed` so the Runtime registers it. Downloads publish
`huggingface_hub.download` events (start, progress, finish per file). With `offline: true` nothing
touches the network and only cached repos can be pulled. The token goes to the library and nowhere
else: not into logs, errors, events or status.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import httpx2
import huggingface_hub as hub
from huggingface_hub import errors as hub_errors
from omegaconf import OmegaConf

from runtime.config_schema import IntegrationConfig, IntegrationType, ModelConfig, RetryConfig
from runtime.engines.detect import ModelFormatError, detect_engine
from runtime.engines.engine import ModelSpec
from runtime.errors import ConfigError, shown
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import ModelProvider
from runtime.integrations.huggingface_hub.hub_files import (
    HubError,
    HubNotCached,
    HubNotFound,
    Selection,
    cached_repos,
    cached_snapshot,
    check_file_answer,
    parse_source,
    progress_class,
    select_files,
)
from runtime.integrations.settings import defaults_of
from runtime.secrets import redact_text


@dataclass
class HuggingFaceHubSettings:
    """`integrations.huggingface_hub.settings`."""

    api_token: str = ""  # HUGGINGFACE_TOKEN; never a token saved on the machine
    endpoint: str = "https://huggingface.co"  # the Hub or a mirror (HF_ENDPOINT)
    cache_dir: str = "~/.cache/tiffin/hf"  # downloads, in the HF cache layout (TIFFIN_HF_CACHE)
    offline: bool = False  # serve only from the cache (HF_HUB_OFFLINE)
    prefer_quant: str = "Q4_K_M"  # among several .gguf files of a repo, the one named so
    # Per model id: aliases, chat_format, defaults, context_length... (ModelConfig fields).
    models: dict[str, Any] = field(default_factory=dict)
    # hf://org/repo[/file.gguf] sources to download (or find in the cache) at start and serve.
    pull: list[str] = field(default_factory=list)


DEFAULT_HUGGINGFACEHUBINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.huggingface_hub.HuggingFaceHubIntegration",
    name="huggingface_hub",
    type=IntegrationType.model_platform,
    priority=25,
    health_check_interval=300.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(HuggingFaceHubSettings),
)
T = TypeVar("T")
PROGRESS_STEP = 1 << 20  # bytes between progress events of one file


@dataclass
class Download:
    """What `download_model` fetched: the snapshot folder, its files, and the GGUF chosen."""

    repo_id: str
    commit: str
    snapshot: Path
    files: list[Path] = field(default_factory=list)
    gguf: str | None = None
    reason: str = ""


class HuggingFaceHubIntegration(BaseIntegration, ModelProvider):
    """Search, inspect and download Hub models; downloaded ones are offered to the ModelRouter."""

    settings_schema: ClassVar[type[Any]] = HuggingFaceHubSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        endpoint = self.settings["endpoint"] or HuggingFaceHubSettings.endpoint
        self.endpoint = str(endpoint).rstrip("/")
        self.cache_dir = Path(str(self.settings["cache_dir"]))
        self.cache_dir = self.cache_dir.expanduser()
        self.offline = _truthy(self.settings["offline"])
        quant = self.settings["prefer_quant"] or HuggingFaceHubSettings.prefer_quant
        self.prefer_quant = str(quant)
        self.overrides: dict[str, Any] = dict(self.settings["models"])
        # False, not None: never fall back to a token saved on this machine by `hf auth login`.
        self._token: str | bool = str(self.settings["api_token"] or "") or False
        self.api = hub.HfApi(endpoint=self.endpoint, token=self._token)
        self.specs: dict[str, ModelSpec] = {}
        self.sources = [str(s) for s in self.settings["pull"]]
        for index, source in enumerate(self.sources):
            try:
                parse_source(source)
            except HubError as exc:
                key = f"integrations.{self.name}.settings.pull[{index}]"
                raise ConfigError(key, shown(source), "hf://org/repo[/file.gguf]") from exc

    async def initialize(self) -> None:
        await asyncio.to_thread(self.cache_dir.mkdir, parents=True, exist_ok=True)
        if not self.offline:
            await self._ping()
        self.specs = await asyncio.to_thread(self._cached_specs)
        for source in self.sources:  # a failure fails the start; the manager retries it
            parsed = parse_source(source)
            download = await self.download_model(parsed.repo_id, parsed.filename)
            spec = self._spec(parsed.repo_id, download.snapshot, download.gguf, parsed.filename)
            self.specs[spec.config.id] = spec

    async def health_check(self) -> Health:
        if self.offline:
            if not os.access(self.cache_dir, os.R_OK | os.X_OK):
                return Health(False, f"offline, and the cache {self.cache_dir} is not readable")
            return Health(True, f"offline, serving {len(self.specs)} cached models")
        started = time.perf_counter()
        await self._ping()
        return Health(True, f"{self.endpoint} answers", latency_s=time.perf_counter() - started)

    async def _ping(self) -> None:
        await self._call(lambda: list(self.api.list_models(limit=1)), what="the Hub")

    # --- the platform guide's calls -----------------------------------------------------------

    async def search_models(self, query: str, limit: int = 10) -> list[dict[str, Any]]:
        """Models whose id matches `query`, as the Hub lists them."""
        self._require_online("search models")
        found = await self._call(
            lambda: list(self.api.list_models(search=query, limit=limit)), what="model search"
        )
        return [
            {
                "id": m.id,
                "downloads": m.downloads,
                "likes": m.likes,
                "tags": list(m.tags or []),
                "pipeline_tag": m.pipeline_tag,
            }
            for m in found
        ]

    async def get_model_info(self, repo_id: str, revision: str | None = None) -> dict[str, Any]:
        """The repo's commit and files, with sizes."""
        self._require_online(f"read {repo_id}")
        info = await self._call(
            lambda: self.api.model_info(repo_id, revision=revision, files_metadata=True),
            what=repo_id,
        )
        files = [{"name": s.rfilename, "size": s.size} for s in info.siblings or []]
        return {
            "id": info.id,
            "sha": info.sha,
            "files": files,
            "gguf_files": [f["name"] for f in files if str(f["name"]).lower().endswith(".gguf")],
            "tags": list(info.tags or []),
            "pipeline_tag": info.pipeline_tag,
        }

    async def download_model(
        self,
        repo_id: str,
        filename: str | None = None,
        *,
        allow_patterns: list[str] | None = None,
        revision: str = "main",
    ) -> Download:
        """Download (or, offline, find in the cache) the files of `repo_id` that `filename` or
        `allow_patterns` select, keeping one .gguf when there are several (`prefer_quant`)."""
        if self.offline:
            names, sizes = await asyncio.to_thread(self._cached_files, repo_id, revision)
        else:
            info = await self.get_model_info(repo_id, revision)
            names = [str(f["name"]) for f in info["files"]]
            sizes = {str(f["name"]): int(f["size"] or 0) for f in info["files"]}
        selection = select_files(
            names,
            sizes,
            filename=filename,
            allow_patterns=allow_patterns,
            prefer_quant=self.prefer_quant,
            repo_id=repo_id,
        )
        if selection.gguf and selection.reason:
            self.log.info("gguf chosen", repo=repo_id, file=selection.gguf, why=selection.reason)
        paths = [
            await self._fetch(repo_id, name, revision, sizes.get(name)) for name in selection.files
        ]
        snapshot = paths[0].parent
        for _ in Path(selection.files[0]).parts[1:]:
            snapshot = snapshot.parent
        return Download(repo_id, snapshot.name, snapshot, paths, selection.gguf, _reason(selection))

    async def pull(self, source: str) -> ModelSpec:
        """Download `hf://org/repo[/file.gguf]` and make it servable (announced by a
        `models.changed` event, which the Runtime answers by registering it)."""
        parsed = parse_source(source)
        download = await self.download_model(parsed.repo_id, parsed.filename)
        spec = self._spec(parsed.repo_id, download.snapshot, download.gguf, parsed.filename)
        served = self.specs.get(spec.config.id)
        if served is not None and served.path != spec.path:
            # The router keeps a model id it already has; withdraw the old file's model first.
            del self.specs[spec.config.id]
            await self.emit("models.changed", {"models": sorted(self.specs)})
        self.specs[spec.config.id] = spec
        await self.emit("models.changed", {"models": sorted(self.specs)})
        return spec

    # --- models -------------------------------------------------------------------------------

    def models(self) -> list[ModelSpec]:
        return [self.specs[model_id] for model_id in sorted(self.specs)]

    def _cached_specs(self) -> dict[str, ModelSpec]:
        """A spec for every repo in the cache that can be served; others are logged and skipped."""
        specs = dict(self.specs)  # pulled by file name: keep what this process pulled
        for repo_id in cached_repos(self.cache_dir):
            snapshot = cached_snapshot(self.cache_dir, repo_id)
            assert snapshot is not None
            names = [p.name for p in snapshot.iterdir()]
            sizes = {p.name: p.stat().st_size for p in snapshot.iterdir() if p.is_file()}
            try:
                gguf = select_files(
                    names,
                    sizes,
                    filename=None,
                    allow_patterns=None,
                    prefer_quant=self.prefer_quant,
                    repo_id=repo_id,
                ).gguf
                spec = self._spec(repo_id, snapshot, gguf, None)
            except (HubError, ModelFormatError) as exc:
                self.log.warning("cached repo not servable", repo=repo_id, reason=str(exc))
                continue
            specs.setdefault(spec.config.id, spec)
        return specs

    def _spec(self, repo_id: str, snapshot: Path, gguf: str | None, named: str | None) -> ModelSpec:
        path = snapshot / gguf if gguf else snapshot
        model_id = Path(named).stem if named else repo_id
        source = f"hf://{repo_id}" + (f"/{named}" if named else "")
        node = OmegaConf.merge(
            OmegaConf.structured(ModelConfig),
            {"id": model_id, "source": source},
            self.overrides.get(model_id) or {},
        )
        config = cast(ModelConfig, OmegaConf.to_object(node))
        engine = detect_engine(path) if config.engine == "auto" else config.engine
        return ModelSpec(config, path, engine, self.name)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["offline"] = self.offline
        described["models"] = [
            {"id": s.config.id, "engine": s.engine, "file": s.path.name} for s in self.models()
        ]
        return described

    # --- downloads ----------------------------------------------------------------------------

    async def _fetch(self, repo_id: str, name: str, revision: str, size: int | None) -> Path:
        """One file into the cache, with start / progress / finish events."""
        event = {"repo": repo_id, "file": name, "total": size}
        if not self.offline:
            await self.emit("huggingface_hub.download", {**event, "phase": "start"})
        loop = asyncio.get_running_loop()
        reported = [0]

        def report(done: int, total: int | None) -> None:
            # From the library's download thread: hand the event to the loop, at most every MiB.
            if done - reported[0] >= PROGRESS_STEP or (total is not None and done >= total):
                reported[0] = done
                data = {**event, "phase": "progress", "completed": done, "total": total or size}
                loop.call_soon_threadsafe(
                    lambda: loop.create_task(self.emit("huggingface_hub.download", data))
                )

        def fetch() -> tuple[Path, int]:
            if not self.offline:
                self._check_answer(repo_id, name, revision)
            path = hub.hf_hub_download(
                repo_id,
                name,
                revision=revision,
                cache_dir=self.cache_dir,
                endpoint=self.endpoint,
                token=self._token,
                local_files_only=self.offline,
                tqdm_class=progress_class(report),
            )
            return Path(path), os.path.getsize(path)

        local, local_size = await self._call(fetch, what=f"{repo_id}/{name}")
        await asyncio.sleep(0)  # let progress events queued by the thread go out before finish
        if not self.offline:
            finished = {**event, "phase": "finish", "size": local_size}
            await self.emit("huggingface_hub.download", finished)
        return local

    def _check_answer(self, repo_id: str, name: str, revision: str) -> None:
        """Ask for the file's metadata first and refuse names the cache cannot use (see
        hub_files.check_file_answer). The library asks again as it downloads: a mirror that
        answers differently the second time is beyond this check."""
        url = hub.hf_hub_url(repo_id, name, revision=revision, endpoint=self.endpoint)
        meta = hub.get_hf_file_metadata(url, token=self._token, endpoint=self.endpoint)
        xet = meta.xet_file_data.file_hash if meta.xet_file_data is not None else None
        check_file_answer(f"{repo_id}/{name}", meta.etag, meta.commit_hash, xet)

    def _cached_files(self, repo_id: str, revision: str) -> tuple[list[str], dict[str, int]]:
        snapshot = cached_snapshot(self.cache_dir, repo_id, revision)
        if snapshot is None:
            raise HubNotCached(
                f"{repo_id} is not in the cache at {self.cache_dir}, and offline mode is on "
                "(integrations.huggingface_hub.settings.offline); download it while online first"
            )
        files = sorted(p for p in snapshot.rglob("*") if p.is_file())
        names = [p.relative_to(snapshot).as_posix() for p in files]
        return names, {n: p.stat().st_size for n, p in zip(names, files, strict=True)}

    def _require_online(self, what: str) -> None:
        if self.offline:
            raise HubNotCached(f"cannot {what}: offline mode is on, only the cache is served")

    async def _call(self, fn: Callable[[], T], *, what: str) -> T:
        """Run a blocking library call in a thread; its failures become HubErrors."""
        try:
            return await asyncio.to_thread(fn)
        except hub_errors.RepositoryNotFoundError:
            raise HubNotFound(f"repository {what} not found on {self.endpoint}") from None
        except (hub_errors.RemoteEntryNotFoundError, hub_errors.RevisionNotFoundError) as exc:
            raise HubNotFound(f"{what}: {_first_line(exc)}") from None
        except hub_errors.LocalEntryNotFoundError:
            raise HubNotCached(
                f"{what} is not in the cache at {self.cache_dir}"
                + (", and offline mode is on" if self.offline else f" and {self.endpoint} failed")
            ) from None
        except hub_errors.HfHubHTTPError as exc:
            raise HubError(f"{what}: the Hub answered {_first_line(exc)}") from None
        except httpx2.TransportError as exc:
            raise HubError(
                f"{what}: the Hub at {self.endpoint} did not answer ({type(exc).__name__})"
            ) from None
        except OSError as exc:
            raise HubError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from None
        except ValueError as exc:  # the library refusing a name or an answer it cannot use
            raise HubError(f"{what}: unusable answer from the Hub: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


def _reason(selection: Selection) -> str:
    return f"{selection.gguf}: {selection.reason}" if selection.gguf else ""


def _truthy(value: Any) -> bool:
    """`offline` may come from HF_HUB_OFFLINE as a string ("1", "true", "yes")."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
