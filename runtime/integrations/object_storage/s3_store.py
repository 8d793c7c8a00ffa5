"""Objects in an S3-compatible store (AWS S3, MinIO, Ceph, R2...) through aiobotocore, under
`prefix` in one bucket. Credentials are the client's own: the settings' (from the environment
by default: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), else botocore's usual chain."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from runtime.integrations.object_storage.object_stores import ObjectInfo, ObjectNotFound, check_key

MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3ObjectStore:
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str = "",
        region: str = "",
        prefix: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        create_bucket: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = prefix
        self.create_bucket = create_bucket
        self._options: dict[str, Any] = {
            "endpoint_url": endpoint_url or None,
            "region_name": region or None,
            "config": AioConfig(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},  # MinIO and moto serve buckets as paths
            ),
        }
        if access_key_id and secret_access_key:
            self._options["aws_access_key_id"] = access_key_id
            self._options["aws_secret_access_key"] = secret_access_key
        self._exit: AsyncExitStack | None = None
        self._client: Any = None

    async def _s3(self) -> Any:
        if self._client is None:
            exit_stack = AsyncExitStack()
            session = get_session()
            self._client = await exit_stack.enter_async_context(
                session.create_client("s3", **self._options)
            )
            self._exit = exit_stack
        return self._client

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        s3 = await self._s3()
        await s3.put_object(
            Bucket=self.bucket, Key=self._name(key), Body=data, ContentType=content_type
        )

    async def get(self, key: str) -> bytes:
        s3 = await self._s3()
        try:
            answer = await s3.get_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in MISSING:
                raise ObjectNotFound(key) from None
            raise
        async with answer["Body"] as body:
            data: bytes = await body.read()
        return data

    async def stat(self, key: str) -> ObjectInfo | None:
        s3 = await self._s3()
        try:
            head = await s3.head_object(Bucket=self.bucket, Key=self._name(key))
        except ClientError as exc:
            if _code(exc) in MISSING:
                return None
            raise
        return ObjectInfo(key, int(head["ContentLength"]))

    async def delete(self, key: str) -> bool:
        if await self.stat(key) is None:  # S3 answers a delete of nothing with success
            return False
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=self._name(key))
        return True

    async def keys(self, prefix: str = "") -> list[str]:
        s3 = await self._s3()
        found: list[str] = []
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        async for page in pages:
            found += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
        return sorted(found)

    async def check(self) -> str:
        s3 = await self._s3()
        try:
            await s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in MISSING or not self.create_bucket:
                raise
            await s3.create_bucket(Bucket=self.bucket)
        where = self.endpoint_url or "AWS"
        return f"bucket {self.bucket} at {where}" + (
            f", under {self.prefix}" if self.prefix else ""
        )

    async def close(self) -> None:
        if self._exit is not None:
            exit_stack, self._exit, self._client = self._exit, None, None
            await exit_stack.aclose()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
