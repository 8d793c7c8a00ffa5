"""A real RabbitMQ (Debian's `rabbitmq-server`) on free loopback ports in a temp dir: its own
node name, data, logs, Erlang cookie and port mapper (epmd on a free port), so it touches
nothing of a system broker. The default `guest` user, which RabbitMQ allows from loopback only.
A missing binary skips the test, or fails it under CI=true (scripts/setup-system installs it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aio_pika

from tests.binaries import require_binary
from tests.conftest import free_port


class RabbitServer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.epmd_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        (self.workdir / "enabled_plugins").write_text("[].\n")
        return {
            **os.environ,
            "HOME": str(self.workdir),
            "RABBITMQ_NODENAME": f"tiffin{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
        }

    def start(self) -> None:
        # The script under /usr/lib runs the broker as this user; /usr/sbin's switches users.
        binary = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        command = str(binary) if binary.exists() else require_binary("rabbitmq-server")
        self.process = subprocess.Popen(
            [command],
            env=self.env(),
            stdout=(self.workdir / "stdout.log").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 90
        while not asyncio.run(self._answers()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "stdout.log").read_text(errors="replace")[-3000:]
                self.stop()
                raise AssertionError(f"rabbitmq-server did not start: {log}")
            time.sleep(0.5)

    async def _answers(self) -> bool:
        try:  # the port first: aio-pika logs every refused connection
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.close()
        except OSError:
            return False
        try:
            connection = await aio_pika.connect(self.url, timeout=2)
        except Exception:
            return False
        await connection.close()
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self.process = None
        epmd = shutil.which("epmd")
        if epmd:  # the port mapper the node started for itself
            subprocess.run(
                [epmd, "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                timeout=10,
                check=False,
            )


@contextmanager
def running_rabbitmq() -> Iterator[RabbitServer]:
    workdir = Path(tempfile.mkdtemp(prefix="tiffin-rabbit-"))
    server = RabbitServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
