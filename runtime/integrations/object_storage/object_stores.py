"""Where files live: one interface (`ObjectStore`) over the local filesystem (here) and any
S3-compatible store (s3_store.py). Keys are relative, slash-separated names
(`files/file-abc123`); a key that could leave its root (`..`, a leading `/`, a backslash, a
control character) is refused before any I/O."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

_SEGMENT = re.compile(r"^[A-Za-z0-9._=-]+$")


class ObjectNotFound(KeyError):
    """No object under that key."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def check_key(key: str) -> str:
    """`key` if it is a safe relative name; ValueError naming it otherwise."""
    segments = key.split("/")
    if not key or any(s in ("", ".", "..") or not _SEGMENT.match(s) for s in segments):
        raise ValueError(
            f"object key {key!r}: expected names of letters, digits and ._=- joined by /"
        )
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """Bytes by key. Every method may raise OSError (or the store's own error) when the store
    cannot be reached; `get` raises ObjectNotFound for a missing key."""

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...

    async def get(self, key: str) -> bytes: ...

    async def stat(self, key: str) -> ObjectInfo | None: ...

    async def delete(self, key: str) -> bool:
        """True if there was an object to delete."""
        ...

    async def keys(self, prefix: str = "") -> list[str]: ...

    async def check(self) -> str:
        """Raise when the store cannot be used; else a line saying what it is."""
        ...

    async def close(self) -> None: ...


class LocalObjectStore:
    """Objects as files under `root`; a write lands whole (a temporary file renamed)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    async def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        try:
            size = (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None
        return ObjectInfo(key, size)

    async def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            return False
        return True

    async def keys(self, prefix: str = "") -> list[str]:
        # Only the folder the prefix names is walked: `batch-results/b1/` lists one folder.
        folder = prefix.rpartition("/")[0]
        start = self._path(folder) if folder else self.root

        def walk() -> list[str]:
            if not start.is_dir():
                return []
            found = (
                p.relative_to(self.root).as_posix()
                for p in start.rglob("*")
                if p.is_file() and not p.name.startswith(".incoming-")
            )
            return sorted(k for k in found if k.startswith(prefix))

        return await asyncio.to_thread(walk)

    async def check(self) -> str:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(f"{self.root} is not writable")

        await asyncio.to_thread(probe)
        return f"local directory {self.root}"

    async def close(self) -> None:
        return None
