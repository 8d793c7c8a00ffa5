"""A real PostgreSQL (Debian's `postgresql` package) in a temp dir on a free loopback port, for
the database integration's tests. `initdb` and `postgres` refuse to run as root, so as root the
cluster belongs to the `postgres` user the package creates (commands run through `runuser`).
Missing binaries skip the test, or fail it under CI=true (scripts/setup-system installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.binaries import in_ci
from tests.conftest import free_port

SERVICE_USER = "postgres"


def postgres_bin(name: str) -> str:
    """`initdb`, `pg_ctl`...: on PATH, or where Debian puts them (/usr/lib/postgresql/N/bin)."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        message = f"{name} is not installed (scripts/setup-system installs postgresql)"
        if in_ci():
            pytest.fail(f"{message}; CI must not skip it")
        pytest.skip(message)
    return found


class Postgres:
    """One throwaway cluster; `stop()` and `start()` make outages."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.port = port
        self.log = workdir / "postgres.log"
        self.url = f"postgresql://tiffin:tiffin-test-pw@127.0.0.1:{port}/postgres"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", SERVICE_USER, "--"] if os.geteuid() == 0 else []
        result = subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=120, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{' '.join(command)}: {result.stdout}{result.stderr}{log}")

    def init(self) -> None:
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", "tiffin", "--auth=trust")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1"
        pg_ctl = postgres_bin("pg_ctl")
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    # Not pytest's tmp_path: its parents are root's alone, and the server runs as `postgres`.
    workdir = Path(tempfile.mkdtemp(prefix="tiffin-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, SERVICE_USER, SERVICE_USER)
    server = Postgres(workdir, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
