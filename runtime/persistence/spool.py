"""The request log's spool: JSON-lines files under the data dir holding the records written
while the database was down, one file per process, so workers sharing a data dir never
replay (and delete) a file another one is still appending to. A file left by a process that
is gone (a crash, a restart) is adopted, by an atomic rename, by the next process to start."""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

import structlog

PREFIX = "request-log.spool"
_NAME = re.compile(rf"^{re.escape(PREFIX)}\.(?P<pid>\d+)(\.from-[0-9a-f]+)?\.jsonl$")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class Spool:
    """This process's spool files in `directory`."""

    def __init__(self, directory: Path, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.path = directory / f"{PREFIX}.{self.pid}.jsonl"  # where new records go
        self.log = structlog.get_logger("tiffin.request_log")

    def append(self, rows: list[dict[str, Any]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)

    def files(self) -> list[Path]:
        """This process's files: adopted ones first (older), then its own."""
        adopted = sorted(self.directory.glob(f"{PREFIX}.{self.pid}.from-*.jsonl"))
        return [*adopted, *([self.path] if self.path.exists() else [])]

    def exists(self) -> bool:
        return bool(self.files())

    def read(self, path: Path) -> list[dict[str, Any]]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash mid-append: nothing to save
                if line.strip():
                    self.log.warning("request log spool: unreadable line skipped", file=str(path))
        return rows

    def adopt_orphans(self) -> int:
        """Take over the files of processes that are gone; returns how many were adopted."""
        adopted = 0
        for path in self.directory.glob(f"{PREFIX}.*.jsonl"):
            match = _NAME.match(path.name)
            if match is None or int(match["pid"]) == self.pid:
                continue
            if process_alive(int(match["pid"])):
                continue
            target = self.directory / f"{PREFIX}.{self.pid}.from-{uuid.uuid4().hex[:12]}.jsonl"
            with contextlib.suppress(FileNotFoundError):  # another process adopted it first
                path.rename(target)
                adopted += 1
        return adopted
