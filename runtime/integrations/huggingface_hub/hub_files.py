"""Pure helpers of the huggingface_hub integration: `hf://` sources, which files of a repo to
download (GGUF quant selection), the cache's layout, and the progress reporter the library's
downloads drive. No network and no event loop here, so each is easy to test and to reason about."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.errors import quoted

SCHEME = "hf://"
# A drive (`C:`), and characters no file name of a repo has: NUL and the other controls.
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What the library makes cache paths of: blobs/<etag> (a git blob id or a sha256 on the Hub),
# snapshots/<commit>, and a Xet hash. Plain names only: no `/`, no leading `.`.
_BLOB_NAME = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z._-]{0,127}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(Exception):
    """An expected failure of a Hub call, with the HTTP status a handler should answer."""

    status = 502
    code = "hub_error"


class HubSourceError(HubError):
    status = 400
    code = "invalid_source"


class HubFileNameError(HubError):
    """The Hub (or a mirror) listed a file name that is not a plain path inside the repo."""

    status = 400
    code = "unsafe_file_name"


class HubUnsafeAnswer(HubError):
    """The Hub (or a mirror) answered a download with names the cache cannot safely use."""

    code = "unsafe_hub_answer"


class HubNotFound(HubError):
    status = 404
    code = "not_found"


class HubNotCached(HubError):
    """Offline, and the cache does not hold what was asked for."""

    status = 409
    code = "not_cached"


@dataclass(frozen=True)
class Source:
    """`hf://org/repo[/file.gguf]`: a repo, and optionally one file of it."""

    repo_id: str
    filename: str | None = None


MAX_SOURCE_CHARS = 1024  # far past any repo id and file name; bounds what errors repeat


def parse_source(source: str) -> Source:
    if len(source) > MAX_SOURCE_CHARS:
        raise HubSourceError(
            f"source {quoted(source)} is too long; expected at most {MAX_SOURCE_CHARS} characters"
        )
    if not source.startswith(SCHEME):
        raise HubSourceError(
            f"source {quoted(source)} is not a Hugging Face source; expected hf://org/repo or "
            "hf://org/repo/file.gguf"
        )
    parts = [p for p in source[len(SCHEME) :].split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise HubSourceError(
            f"source {quoted(source)} names no repository; expected hf://org/repo[/file.gguf]"
        )
    filename = "/".join(parts[2:]) or None
    return Source(f"{parts[0]}/{parts[1]}", filename)


@dataclass(frozen=True)
class Selection:
    """The files to download, and which GGUF was chosen among several (and why)."""

    files: list[str]
    gguf: str | None = None
    reason: str = ""


def select_files(
    names: Sequence[str],
    sizes: dict[str, int],
    *,
    filename: str | None,
    allow_patterns: Sequence[str] | None,
    prefer_quant: str,
    repo_id: str,
) -> Selection:
    """One file when `filename` is given; else the files matching `allow_patterns` (all when
    None), keeping only one .gguf: a repo usually ships one per quantisation and serving needs
    one. The chosen one names `prefer_quant` (case-insensitive), else it is the smallest.
    Raises HubFileNameError if any listed name is unsafe (see `check_file_names`)."""
    check_file_names(names, repo_id)
    if filename is not None:
        if filename not in names:
            raise HubNotFound(
                f"{repo_id} has no file {quoted(filename)}; it has: {', '.join(names)}"
            )
        return Selection([filename], filename if _is_gguf(filename) else None, "named in source")
    matched = [n for n in names if _matches(n, allow_patterns)]
    if not matched:
        raise HubNotFound(
            f"no file of {repo_id} matches {list(allow_patterns or [])}; it has: {', '.join(names)}"
        )
    ggufs = [n for n in matched if _is_gguf(n)]
    if len(ggufs) <= 1:
        return Selection(matched, ggufs[0] if ggufs else None, "the only .gguf" if ggufs else "")
    preferred = [n for n in ggufs if prefer_quant.lower() in n.lower()]
    if preferred:
        chosen, reason = preferred[0], f"its name contains {prefer_quant}"
    else:
        chosen = min(ggufs, key=lambda n: (sizes.get(n, 0), n))
        reason = f"no .gguf names {prefer_quant}; the smallest of {len(ggufs)}"
    return Selection([n for n in matched if not _is_gguf(n) or n == chosen], chosen, reason)


def check_file_names(names: Sequence[str], repo_id: str) -> None:
    """Refuse a listing that holds a name which is not a plain relative path inside the repo:
    absolute (`/x`, `C:x`, `\\x`), climbing out (`..`), with backslashes or control characters.
    The Hub never lists such names; a mirror that does is not trusted for any file of the repo,
    so nothing of it is downloaded (a file would land outside its folder in the cache)."""
    for name in names:
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or _DRIVE.match(name)
            or _CONTROL.search(name)
            or any(part in ("", ".", "..") for part in parts)
        ):
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise HubFileNameError(
                f"{repo_id} lists the file name {shown!r}, which is not a path inside the "
                "repository; expected a relative path such as dir/model.gguf, without '..', "
                "'.', empty parts, backslashes or a leading '/' or drive (nothing was downloaded)"
            )


def check_file_answer(
    what: str, etag: str | None, commit: str | None, xet_hash: str | None = None
) -> None:
    """Refuse a file's metadata (the answer to its HEAD) whose ETag, commit or Xet hash is not a
    plain name: huggingface_hub writes the download to `blobs/<etag>` and links it from
    `snapshots/<commit>`, so a mirror's `ETag: "../../x"` would put a file outside the cache."""
    checks = [("ETag", etag, _BLOB_NAME), ("commit", commit, _COMMIT)]
    if xet_hash is not None:
        checks.append(("Xet hash", xet_hash, _BLOB_NAME))
    for label, value, pattern in checks:
        if value is None or not pattern.match(value):
            shown = "none" if value is None else repr(value[:100])
            raise HubUnsafeAnswer(
                f"{what}: the Hub answered the {label} {shown}, which the cache cannot use; "
                "expected "
                + ("a 40-character hex commit" if pattern is _COMMIT else "a plain hash")
                + " (nothing was downloaded)"
            )


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """The library's cache folder for a model repo: `models--org--repo`."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(cache_dir: Path, repo_id: str, revision: str = "main") -> Path | None:
    """The snapshot folder `refs/<revision>` points at, when the cache has one."""
    folder = repo_folder(cache_dir, repo_id)
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def cached_repos(cache_dir: Path) -> list[str]:
    """The model repos the cache holds a `main` snapshot of, as org/repo ids."""
    found = []
    for folder in sorted(cache_dir.glob("models--*--*")):
        repo_id = folder.name.removeprefix("models--").replace("--", "/", 1)
        if cached_snapshot(cache_dir, repo_id) is not None:
            found.append(repo_id)
    return found


Report = Callable[[int, int | None], None]


def progress_class(report: Report) -> type[Any]:
    """A stand-in for tqdm that the library's `tqdm_class` hook instantiates for each file:
    every `update(n)` reports (bytes so far, total). It draws nothing, as a server should not."""

    class Progress:
        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **_: Any):
            self.total = total
            self.n = initial

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            report(self.n, self.total)

        def close(self) -> None:
            pass

        def __enter__(self) -> Progress:
            return self

        def __exit__(
            self,
            kind: type[BaseException] | None,
            value: BaseException | None,
            traceback: TracebackType | None,
        ) -> None:
            pass

    return Progress
