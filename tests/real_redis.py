"""A real Redis (Debian's `redis-server`) on a free loopback port in a temp dir, with no
persistence and a password (so tests can check it never shows), for the redis integration's
tests. `stop()` and `start()` on the same port make outages. A missing binary skips the test, or
fails it under CI=true (scripts/setup-system installs it)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.binaries import require_binary
from tests.conftest import free_port

PASSWORD = "redis-test-pw-5c1e"


class RedisServer:
    """One throwaway redis-server; `url` carries the password."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.log = workdir / "redis.log"
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            require_binary("redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--requirepass", PASSWORD,
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(port=self.port, password=PASSWORD, socket_timeout=1)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = (
                            self.log.read_text(errors="replace")[-2000:]
                            if self.log.exists()
                            else ""
                        )
                        raise AssertionError(f"redis-server did not start: {log}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, and nothing answers (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused one could not handle SIGTERM
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    workdir = Path(tempfile.mkdtemp(prefix="tiffin-redis-"))
    server = RedisServer(workdir, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
