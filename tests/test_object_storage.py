"""The object_storage integration: one contract over the local filesystem and an S3-compatible
store (moto in server mode on loopback, driven through Tiffin's real aiobotocore client), unsafe
keys refused, health checks that prove the store answers, credentials never shown."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import DictConfig

import handlers
from runtime.app import Runtime
from runtime.errors import StartupError
from runtime.integrations.capabilities import ObjectStoreProvider
from runtime.integrations.object_storage import (
    LocalObjectStore,
    ObjectNotFound,
    ObjectStorageIntegration,
    ObjectStore,
)
from tests.conftest import free_port
from tests.real_s3 import running_s3

Compose = Callable[..., DictConfig]
SECRET = "moto-secret-value"
HANDLERS = handlers.builtin_plugins()
S3 = "integrations.object_storage.settings"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with running_s3() as endpoint:
        yield endpoint


def s3_overrides(endpoint: str, bucket: str, *extra: str) -> list[str]:
    return [
        "integrations=[object_storage]",
        f"{S3}.backend=s3",
        f"{S3}.endpoint_url={endpoint}",
        f"{S3}.bucket={bucket}",
        f"{S3}.region=us-east-1",
        f"{S3}.access_key_id=moto-key-id",
        f"{S3}.secret_access_key={SECRET}",
        *extra,
    ]


@pytest.fixture
async def started(compose_test: Compose) -> AsyncIterator[Callable[..., Runtime]]:
    runtimes: list[Runtime] = []

    async def start(*overrides: str) -> Runtime:
        runtime = Runtime(compose_test(*overrides), builtins=handlers.builtin_plugins())
        runtimes.append(runtime)
        await runtime.start()
        return runtime

    yield start  # type: ignore[misc]
    for runtime in runtimes:
        await runtime.stop()


def store_of(runtime: Runtime) -> ObjectStore:
    integration = runtime.integrations.require("object_storage", ObjectStoreProvider)
    store = integration.object_store()
    assert store is not None
    return store


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, started: Callable[..., Runtime], tmp_path: Path, s3_server: str
) -> ObjectStore:
    if request.param == "local":
        runtime = await started("integrations=[object_storage]", f"{S3}.root={tmp_path / 'o'}")
    else:
        bucket = f"b-{tmp_path.name.lower().replace('_', '-')[-40:]}"
        runtime = await started(*s3_overrides(s3_server, bucket, f"{S3}.create_bucket=true"))
    return store_of(runtime)


async def test_the_contract_on_every_backend(store: ObjectStore) -> None:
    await store.put("files/file-1", b"hello", "text/plain")
    await store.put("files/file-2", b"")
    await store.put("results/batch-1.jsonl", b'{"a": 1}\n')
    assert await store.get("files/file-1") == b"hello"
    assert await store.get("files/file-2") == b""
    assert (await store.stat("files/file-1")).size == 5  # type: ignore[union-attr]
    assert await store.stat("files/none") is None
    assert await store.keys("files/") == ["files/file-1", "files/file-2"]
    await store.put("files/file-1", b"replaced")
    assert await store.get("files/file-1") == b"replaced"
    assert await store.delete("files/file-1") is True
    assert await store.delete("files/file-1") is False
    with pytest.raises(ObjectNotFound):
        await store.get("files/file-1")
    for unsafe in ("../etc/passwd", "/abs", "a//b", "a/./b", "", "a\\b", "a\nb"):
        with pytest.raises(ValueError, match="object key"):
            await store.put(unsafe, b"x")


async def test_a_local_write_lands_whole(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    await store.put("a/b", b"x" * 100_000)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]  # no temporary file left
    assert await store.keys() == ["a/b"]


async def test_s3_health_and_its_secret_never_shown(
    started: Callable[..., Runtime], s3_server: str
) -> None:
    runtime = await started(*s3_overrides(s3_server, "shown", f"{S3}.create_bucket=true"))
    integration = runtime.integrations.get_integration("object_storage")
    assert isinstance(integration, ObjectStorageIntegration)
    health = await integration.health_check()
    assert health.healthy and health.detail == f"bucket shown at {s3_server}, under tiffin/"
    described = json.dumps(integration.describe())
    assert SECRET not in described and "moto-key-id" not in described
    assert SECRET not in json.dumps(runtime.redacted_config(), default=str)


async def test_a_missing_bucket_fails_the_start_clearly(
    compose_test: Compose, s3_server: str
) -> None:
    cfg = compose_test(
        *s3_overrides(s3_server, "never-made"),
        "integrations.object_storage.required=true",
        "integrations.object_storage.retry_config.max_retries=0",
    )
    runtime = Runtime(cfg, builtins=handlers.builtin_plugins())
    with pytest.raises(StartupError) as failed:
        await runtime.start()
    assert "object_storage" in str(failed.value) and "404" in str(failed.value)
    assert SECRET not in str(failed.value)
    await runtime.stop()


async def test_an_unreachable_store_is_unhealthy(started: Callable[..., Runtime]) -> None:
    runtime = await started(
        *s3_overrides(f"http://127.0.0.1:{free_port()}", "gone", f"{S3}.timeout_s=0.5"),
        "integrations.object_storage.retry_config.max_retries=0",
        # Background recovery would retry (and, failing, close the client) under this check.
        "integrations.object_storage.retry_config.initial_delay=60",
    )
    integration = runtime.integrations.get_integration("object_storage")
    assert integration.status.value == "error"
    health = await integration.health_check()
    await integration.shutdown()  # the check opened a client; the manager stops only started ones
    assert not health.healthy and "Connect" in health.detail


def test_settings_are_checked(compose_test: Compose) -> None:
    from runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"settings\.backend"):
        Runtime(
            compose_test("integrations=[object_storage]", f"{S3}.backend=ftp"), builtins=HANDLERS
        )
    with pytest.raises(ConfigError, match=r"settings\.bucket"):
        Runtime(
            compose_test("integrations=[object_storage]", f"{S3}.backend=s3"), builtins=HANDLERS
        )
