"""An S3-compatible store on a free loopback port: moto in server mode, in a thread. Tests drive
it through Tiffin's real aiobotocore client (the object_storage integration)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer

from tests.conftest import free_port


@contextmanager
def running_s3() -> Iterator[str]:
    """The endpoint URL of a fresh moto server, stopped at the end."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
