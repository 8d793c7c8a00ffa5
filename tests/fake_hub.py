"""A small Hugging Face Hub for tests, written from the Hub's HTTP API as huggingface_hub calls
it: `GET /api/models?search=&limit=` (the list), `GET /api/models/{repo}[/revision/{rev}]` (info
with `sha` and `siblings`, sizes and `lfs` when `blobs=true`), and `HEAD`/`GET
/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` and
HTTP Range (206). Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound,
EntryNotFound). `drop_after[file] = n` makes the next full GET of that file stop after n bytes,
as a dropped connection does, so resuming can be tested."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.thread_server import ThreadServer

CHUNK = 1 << 20


@dataclass
class HubFile:
    path: Path
    lfs: bool  # weights are LFS files: etag = sha256, as on the Hub; small files: a git blob id
    size: int = 0
    oid: str = ""

    def __post_init__(self) -> None:
        self.size = self.path.stat().st_size
        digest = hashlib.sha256() if self.lfs else hashlib.sha1(b"blob %d\0" % self.size)
        with self.path.open("rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        self.oid = digest.hexdigest()


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    tags: list[str] = field(default_factory=lambda: ["gguf", "text-generation"])


class FakeHub(ThreadServer):
    def __init__(self, repos: list[HubRepo], port: int | None = None) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        super().__init__(port)
        self.requests: list[dict[str, Any]] = []  # method, path, range, authorization
        self.drop_after: dict[str, int] = {}

    def start(self) -> None:
        self.serve(self.app(), "fake Hub")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/models", self.list_models),
                Route("/api/models/{org}/{name}", self.model_info),
                Route("/api/models/{org}/{name}/revision/{revision}", self.model_info),
                Route(
                    "/{org}/{name}/resolve/{revision}/{filename:path}",
                    self.resolve,
                    methods=["GET", "HEAD"],
                ),
            ]
        )

    def _record(self, request: Request) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "range": request.headers.get("range"),
                "authorization": request.headers.get("authorization"),
            }
        )

    # --- the API ------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        self._record(request)
        search = request.query_params.get("search", "").lower()
        limit = int(request.query_params.get("limit", "1000"))
        found = [r for r in self.repos.values() if search in r.repo_id.lower()][:limit]
        return JSONResponse([self._summary(r) for r in found])

    async def model_info(self, request: Request) -> Response:
        self._record(request)
        repo = self.repos.get(f"{request.path_params['org']}/{request.path_params['name']}")
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        revision = request.path_params.get("revision", "main")
        if revision not in ("main", repo.sha):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        blobs = request.query_params.get("blobs") in ("true", "True", "1")
        siblings = []
        for name, hub_file in sorted(repo.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=hub_file.size, blobId=hub_file.oid)
                if hub_file.lfs:
                    lfs = {"sha256": hub_file.oid, "size": hub_file.size, "pointerSize": 134}
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        return JSONResponse({**self._summary(repo), "sha": repo.sha, "siblings": siblings})

    async def resolve(self, request: Request) -> Response:
        self._record(request)
        repo = self.repos.get(f"{request.path_params['org']}/{request.path_params['name']}")
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if request.path_params["revision"] not in ("main", repo.sha):
            return _error(404, "RevisionNotFound", "Invalid rev id")
        name = request.path_params["filename"]
        hub_file = repo.files.get(name)
        commit = {"X-Repo-Commit": repo.sha}
        if hub_file is None:
            return _error(404, "EntryNotFound", f"{name} does not exist", commit)
        headers = {
            **commit,
            "ETag": f'"{hub_file.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Length": str(hub_file.size),
        }
        if hub_file.lfs:
            headers.update(
                {"X-Linked-Etag": f'"{hub_file.oid}"', "X-Linked-Size": str(hub_file.size)}
            )
        if request.method == "HEAD":
            return Response(headers=headers)
        start, status = 0, 200
        wanted = request.headers.get("range")
        if wanted:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{hub_file.size - 1}/{hub_file.size}"
            headers["Content-Length"] = str(hub_file.size - start)
        stop = hub_file.size
        if not wanted and name in self.drop_after:
            stop = self.drop_after.pop(name)
        body = iterate_in_threadpool(
            _read(hub_file.path, start, stop, dropped=stop < hub_file.size)
        )
        return StreamingResponse(body, status_code=status, headers=headers)

    def _summary(self, repo: HubRepo) -> dict[str, Any]:
        return {
            "_id": repo.sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "likes": 3,
            "downloads": 42,
            "tags": repo.tags,
            "pipeline_tag": "text-generation",
            "library_name": "gguf",
            "private": False,
        }


def _read(path: Path, start: int, stop: int, dropped: bool) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(start)
        left = stop - start
        while left > 0:
            block = handle.read(min(CHUNK, left))
            left -= len(block)
            yield block
    if dropped:  # the connection goes away before Content-Length bytes were sent
        raise ConnectionResetError("fake Hub dropped the connection")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(
        {"error": message}, status_code=status, headers={"X-Error-Code": code, **(headers or {})}
    )
