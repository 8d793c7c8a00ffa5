"""`integrations=object_storage`: where uploaded files and batch results live. The local
filesystem under `root` by default; any S3-compatible store with `backend: s3` (`bucket`,
`endpoint_url`, `region`, `prefix`; credentials from the environment). Others take the store
through `ObjectStoreProvider` (runtime/integrations/capabilities.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from runtime.config_schema import IntegrationConfig, IntegrationType, RetryConfig
from runtime.errors import ConfigError
from runtime.events import EventBus
from runtime.integrations.base import BaseIntegration, Health
from runtime.integrations.capabilities import ObjectStoreProvider
from runtime.integrations.object_storage.object_stores import LocalObjectStore, ObjectStore
from runtime.integrations.object_storage.s3_store import S3ObjectStore
from runtime.integrations.settings import defaults_of
from runtime.secrets import redact_text

BACKENDS = ("local", "s3")


@dataclass
class ObjectStorageSettings:
    """`integrations.object_storage.settings`."""

    backend: str = "local"  # local | s3
    root: str = ".tiffin/data/objects"  # local: the directory (TIFFIN_DATA_DIR/objects)
    bucket: str = ""  # s3: the bucket (OBJECT_STORAGE_BUCKET)
    endpoint_url: str = ""  # s3: empty for AWS, else MinIO's, R2's... (OBJECT_STORAGE_ENDPOINT)
    region: str = ""  # s3: AWS_REGION
    prefix: str = "tiffin/"  # s3: every key Tiffin writes starts with it
    access_key_id: str = ""  # s3: AWS_ACCESS_KEY_ID; empty: botocore's own chain
    secret_access_key: str = ""  # s3: AWS_SECRET_ACCESS_KEY
    create_bucket: bool = False  # s3: make the bucket at start when it does not exist
    timeout_s: float = 10.0  # s3: connect and read timeout of each call


DEFAULT_OBJECTSTORAGEINTEGRATION_CONFIG = IntegrationConfig(
    _target_="runtime.integrations.object_storage.ObjectStorageIntegration",
    name="object_storage",
    type=IntegrationType.external_service,
    priority=15,
    health_check_interval=30.0,
    retry_config=RetryConfig(max_retries=3, backoff_factor=2.0, max_backoff=60.0),
    settings=defaults_of(ObjectStorageSettings),
)


class ObjectStorageIntegration(BaseIntegration, ObjectStoreProvider):
    """One ObjectStore, checked at start and by every health check."""

    settings_schema: ClassVar[type[Any]] = ObjectStorageSettings

    def __init__(self, config: IntegrationConfig, bus: EventBus | None = None) -> None:
        super().__init__(config, bus)
        backend = str(self.settings["backend"])
        where = f"integrations.{self.name}.settings"
        if backend not in BACKENDS:
            raise ConfigError(f"{where}.backend", backend, f"one of: {', '.join(BACKENDS)}")
        if backend == "s3" and not self.settings["bucket"]:
            raise ConfigError(f"{where}.bucket", "", "a bucket name with backend: s3")
        self.store: ObjectStore = (
            S3ObjectStore(
                bucket=str(self.settings["bucket"]),
                endpoint_url=str(self.settings["endpoint_url"]),
                region=str(self.settings["region"]),
                prefix=str(self.settings["prefix"]),
                access_key_id=str(self.settings["access_key_id"]),
                secret_access_key=str(self.settings["secret_access_key"]),
                create_bucket=bool(self.settings["create_bucket"]),
                timeout_s=float(self.settings["timeout_s"]),
            )
            if backend == "s3"
            else LocalObjectStore(Path(str(self.settings["root"])).expanduser())
        )
        self.where = ""

    def object_store(self) -> ObjectStore | None:
        return self.store if self.initialized else None

    async def initialize(self) -> None:
        try:
            self.where = await self.store.check()
        except BaseException:
            await self.store.close()  # nothing left open: a retry opens it again
            raise

    async def health_check(self) -> Health:
        try:
            self.where = await self.store.check()
        except Exception as exc:
            return Health(False, redact_text(f"{type(exc).__name__}: {exc}"))
        return Health(True, self.where)

    async def shutdown(self) -> None:
        await self.store.close()
