"""object_storage: files and batch results in the local filesystem or an S3-compatible store
(`object_storage_integration.py`), behind one interface (`object_stores.py`, `s3_store.py`)."""

from runtime.integrations.object_storage.object_storage_integration import (
    DEFAULT_OBJECTSTORAGEINTEGRATION_CONFIG,
    ObjectStorageIntegration,
    ObjectStorageSettings,
)
from runtime.integrations.object_storage.object_stores import (
    LocalObjectStore,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
)
from runtime.integrations.object_storage.s3_store import S3ObjectStore

__all__ = [
    "DEFAULT_OBJECTSTORAGEINTEGRATION_CONFIG",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStorageIntegration",
    "ObjectStorageSettings",
    "ObjectStore",
    "S3ObjectStore",
]
