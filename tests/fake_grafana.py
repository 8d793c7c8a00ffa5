"""A small Grafana for tests, written from Grafana's published HTTP API documentation
(developers/http_api: other.md, data_source.md, folder.md, dashboard.md):

- `GET /api/health` (no auth): `{"commit", "database": "ok", "version"}`;
- `GET /api/datasources`, `GET|PUT /api/datasources/uid/{uid}`, `POST /api/datasources`
  (409 when the name or uid is taken; read-only, provisioned datasources refuse updates);
- `GET|PUT /api/folders/{uid}`, `POST /api/folders` (409 when the uid is taken);
- `POST /api/dashboards/db` (`{"id","uid","url","status":"success","version","slug"}`; 412
  `version-mismatch` when `overwrite` is false and the version differs, 412 `name-exists` for
  another dashboard's title in the folder; 400 for a provisioned one) and
  `GET /api/dashboards/uid/{uid}` (`{"dashboard", "meta"}`).

Every other call needs `Authorization: Bearer <api_key>` (401 `{"message": "Invalid API key"}`).
Every write is recorded in `writes` as (method, path, body).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.thread_server import ThreadServer

VERSION = "11.3.0"


def slugify(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


class FakeGrafana(ThreadServer):
    def __init__(self, api_key: str, port: int | None = None) -> None:
        super().__init__(port)
        self.api_key = api_key
        self.datasources: dict[str, dict[str, Any]] = {}
        self.folders: dict[str, dict[str, Any]] = {}
        # uid -> {"dashboard": model, "folderUid": str, "provisioned": bool}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str, Any]] = []
        self.authorizations: list[str | None] = []  # the Authorization header of every call
        self.database = "ok"
        self._ids = 0

    def start(self) -> None:
        self.serve(self.app(), "fake Grafana")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/health", self.health),
                Route("/api/datasources", self.datasource_list_or_create, methods=["GET", "POST"]),
                Route("/api/datasources/uid/{uid}", self.datasource, methods=["GET", "PUT"]),
                Route("/api/folders", self.folder_create, methods=["POST"]),
                Route("/api/folders/{uid}", self.folder, methods=["GET", "PUT"]),
                Route("/api/dashboards/db", self.dashboard_save, methods=["POST"]),
                Route("/api/dashboards/uid/{uid}", self.dashboard_get),
            ]
        )

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def _authorized(self, request: Request) -> tuple[Response | None, Any]:
        header = request.headers.get("authorization")
        self.authorizations.append(header)
        if header != f"Bearer {self.api_key}":
            return JSONResponse({"message": "Invalid API key"}, 401), None
        body = await request.json() if request.method in ("POST", "PUT") else None
        if body is not None:
            self.writes.append((request.method, request.url.path, copy.deepcopy(body)))
        return None, body

    # --- health -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        body = {"commit": "0123abc", "database": self.database, "version": VERSION}
        return JSONResponse(body, 200 if self.database == "ok" else 503)

    # --- datasources --------------------------------------------------------------------------

    async def datasource_list_or_create(self, request: Request) -> Response:
        refused, body = await self._authorized(request)
        if refused:
            return refused
        if request.method == "GET":
            return JSONResponse(list(self.datasources.values()))
        if not body.get("name") or not body.get("type"):
            return JSONResponse({"message": "Required field missing: name or type"}, 400)
        if any(d["name"] == body["name"] for d in self.datasources.values()):
            return JSONResponse({"message": "data source with the same name already exists"}, 409)
        uid = body.get("uid") or f"ds{len(self.datasources) + 1}"
        if uid in self.datasources:
            return JSONResponse({"message": "data source with the same uid already exists"}, 409)
        stored = self._datasource(uid, body, self._next_id(), version=1)
        self.datasources[uid] = stored
        return JSONResponse(
            {
                "datasource": stored,
                "id": stored["id"],
                "message": "Datasource added",
                "name": stored["name"],
            }
        )

    async def datasource(self, request: Request) -> Response:
        refused, body = await self._authorized(request)
        if refused:
            return refused
        uid = request.path_params["uid"]
        stored = self.datasources.get(uid)
        if stored is None:
            return JSONResponse({"message": "Data source not found"}, 404)
        if request.method == "GET":
            return JSONResponse(stored)
        if stored["readOnly"]:
            return JSONResponse({"message": "Cannot update read-only data source"}, 403)
        updated = self._datasource(uid, body, stored["id"], version=stored["version"] + 1)
        self.datasources[uid] = updated
        return JSONResponse(
            {
                "datasource": updated,
                "id": updated["id"],
                "message": "Datasource updated",
                "name": updated["name"],
            }
        )

    def _datasource(self, uid: str, body: dict[str, Any], id_: int, version: int) -> dict[str, Any]:
        return {
            "id": id_,
            "uid": uid,
            "orgId": 1,
            "name": body["name"],
            "type": body["type"],
            "typeLogoUrl": "",
            "access": body.get("access", "proxy"),
            "url": body.get("url", ""),
            "user": "",
            "database": "",
            "basicAuth": bool(body.get("basicAuth")),
            "isDefault": bool(body.get("isDefault")),
            "jsonData": body.get("jsonData") or {},
            "secureJsonFields": {},
            "version": version,
            "readOnly": bool(body.get("readOnly")),
        }

    # --- folders ------------------------------------------------------------------------------

    async def folder_create(self, request: Request) -> Response:
        refused, body = await self._authorized(request)
        if refused:
            return refused
        uid = body.get("uid") or f"f{len(self.folders) + 1}"
        if uid in self.folders:
            return JSONResponse({"message": "a folder with the same uid already exists"}, 409)
        self.folders[uid] = self._folder(uid, body["title"], self._next_id(), version=1)
        return JSONResponse(self.folders[uid])

    async def folder(self, request: Request) -> Response:
        refused, body = await self._authorized(request)
        if refused:
            return refused
        stored = self.folders.get(request.path_params["uid"])
        if stored is None:
            return JSONResponse({"message": "folder not found"}, 404)
        if request.method == "PUT":
            if not body.get("overwrite") and body.get("version") != stored["version"]:
                return JSONResponse({"message": "the folder has been changed by someone else"}, 412)
            stored = self._folder(stored["uid"], body["title"], stored["id"], stored["version"] + 1)
            self.folders[stored["uid"]] = stored
        return JSONResponse(stored)

    def _folder(self, uid: str, title: str, id_: int, version: int) -> dict[str, Any]:
        return {
            "id": id_,
            "uid": uid,
            "title": title,
            "url": f"/dashboards/f/{uid}/{slugify(title)}",
            "hasAcl": False,
            "canSave": True,
            "canEdit": True,
            "canAdmin": True,
            "version": version,
        }

    # --- dashboards ---------------------------------------------------------------------------

    async def dashboard_save(self, request: Request) -> Response:
        refused, body = await self._authorized(request)
        if refused:
            return refused
        model = dict(body.get("dashboard") or {})
        if not model.get("title"):
            return JSONResponse({"message": "Dashboard title cannot be empty"}, 400)
        folder_uid = body.get("folderUid") or ""
        if folder_uid and folder_uid not in self.folders:
            return JSONResponse({"message": "folder not found"}, 400)
        uid = model.get("uid") or f"d{len(self.dashboards) + 1}"
        existing = self.dashboards.get(uid)
        overwrite = bool(body.get("overwrite"))
        if existing and existing["provisioned"]:
            return JSONResponse({"message": "Cannot save provisioned dashboard"}, 400)
        if existing and not overwrite and model.get("version") != existing["dashboard"]["version"]:
            message = "The dashboard has been changed by someone else"
            return JSONResponse({"message": message, "status": "version-mismatch"}, 412)
        clash = [
            u
            for u, d in self.dashboards.items()
            if u != uid
            and d["folderUid"] == folder_uid
            and d["dashboard"]["title"] == model["title"]
        ]
        if clash and not overwrite:
            message = "A dashboard with the same name in the folder already exists"
            return JSONResponse({"message": message, "status": "name-exists"}, 412)
        id_ = existing["dashboard"]["id"] if existing else self._next_id()
        version = existing["dashboard"]["version"] + 1 if existing else 1
        model.update(id=id_, uid=uid, version=version)
        self.dashboards[uid] = {"dashboard": model, "folderUid": folder_uid, "provisioned": False}
        slug = slugify(model["title"])
        return JSONResponse(
            {
                "id": id_,
                "uid": uid,
                "url": f"/d/{uid}/{slug}",
                "status": "success",
                "version": version,
                "slug": slug,
            }
        )

    async def dashboard_get(self, request: Request) -> Response:
        refused, _ = await self._authorized(request)
        if refused:
            return refused
        stored = self.dashboards.get(request.path_params["uid"])
        if stored is None:
            return JSONResponse({"message": "Dashboard not found"}, 404)
        model = stored["dashboard"]
        folder = self.folders.get(stored["folderUid"])
        slug = slugify(model["title"])
        meta = {
            "isStarred": False,
            "url": f"/d/{model['uid']}/{slug}",
            "slug": slug,
            "folderId": folder["id"] if folder else 0,
            "folderUid": stored["folderUid"],
            "folderTitle": folder["title"] if folder else "General",
            "provisioned": stored["provisioned"],
            "version": model["version"],
        }
        return JSONResponse({"dashboard": model, "meta": meta})
