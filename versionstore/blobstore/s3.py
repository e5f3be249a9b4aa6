"""S3 (and S3-compatible) blob store on aiobotocore.

Write-once rests on conditional writes: `If-None-Match: *` on PutObject and on
CompleteMultipartUpload, so racing writers of one key cannot replace each other's bytes.
Retries and deadlines belong to the caller's wrapper, so botocore's own retries are off, and
every provider error leaves this module as a BlobStoreError.
"""

import asyncio
import base64
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, FlexibleChecksumError, HTTPClientError, IncompleteReadError  # type: ignore[import-untyped]

from versionstore.blobstore import BlobInfo, BlobNotFound, BlobStoreError, PermanentStoreError, StoreURL, TransientStoreError

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef, GetObjectRequestTypeDef

MiB = 1 << 20
CHUNK = MiB
MAX_PARTS = 10_000
UPLOAD_OPTIONS = {"part_size", "multipart_threshold", "part_concurrency", "object_lock_days"}
OPTIONS = {"endpoint_url", "region", "profile", "addressing_style", *UPLOAD_OPTIONS}
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "ConditionalRequestConflict", "OperationAborted", "InternalError", "ServiceUnavailable"}
TRANSIENT_TYPES = (HTTPClientError, ConnectionError, IncompleteReadError, FlexibleChecksumError, aiohttp.ClientError, OSError)
# Everything a call may raise that is the provider's doing (OSError covers asyncio.TimeoutError).
PROVIDER_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, OSError)


def _status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) of a ClientError; (0, "") for anything else."""
    if not isinstance(exc, ClientError):
        return 0, ""
    response: dict[str, Any] = exc.response
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)), str(response.get("Error", {}).get("Code", ""))


def _classify(exc: BaseException) -> type[BlobStoreError]:
    status, code = _status(exc)
    if isinstance(exc, ClientError):
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStoreError
        if code in ("NoSuchKey", "NotFound", "404"):  # a HEAD's 404 has no body, so no code but "404"
            return BlobNotFound
        return PermanentStoreError  # AccessDenied, NoSuchBucket, InvalidAccessKeyId, SignatureDoesNotMatch, ...
    return TransientStoreError if isinstance(exc, TRANSIENT_TYPES) else PermanentStoreError


def _option_int(options: dict[str, str], name: str, default: int, minimum: int) -> int:
    try:
        value = int(options.get(name, default))
    except ValueError:
        raise ValueError(f"S3 store option {name}={options[name]!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"S3 store option {name}={value} is below {minimum}")
    return value


def _read_part(source: Path, offset: int, length: int) -> tuple[bytes, str]:
    """One part's bytes and their base64 CRC32, computed off the event loop."""
    with open(source, "rb") as handle:
        handle.seek(offset)
        data = handle.read(length)
    return data, base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", options: dict[str, str] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ValueError(f"Unknown S3 store option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTIONS))})")
        self.bucket, self.prefix = bucket, prefix
        self.name = f"s3://{bucket}/{prefix}".rstrip("/")
        self.part_size = _option_int(options, "part_size", 16 * MiB, 1)  # x part_concurrency = memory bound
        self.multipart_threshold = _option_int(options, "multipart_threshold", 64 * MiB, 1)
        self.part_concurrency = _option_int(options, "part_concurrency", 4, 1)
        self.object_lock_days = _option_int(options, "object_lock_days", 0, 1) if "object_lock_days" in options else 0
        self.endpoint_url = options.get("endpoint_url")
        self.region = options.get("region")
        self.profile = options.get("profile")
        style = options.get("addressing_style", "path" if self.endpoint_url else None)
        if style not in (None, "path", "virtual", "auto"):
            raise ValueError(f"S3 store option addressing_style={style!r} is not path, virtual or auto")
        self.addressing_style = style
        self._s3: S3Client | None = None
        self._stack: AsyncExitStack | None = None
        self._lock = asyncio.Lock()
        self._writers: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_url(cls, location: StoreURL) -> "S3BlobStore":
        return cls(location.bucket, location.prefix, location.options)

    async def _client(self) -> "S3Client":
        """Created on first use: aiobotocore clients belong to the loop that opened them."""
        if self._s3 is not None:
            return self._s3
        async with self._lock:
            if self._s3 is not None:
                return self._s3  # another caller created it while this one waited
            config = AioConfig(
                retries={"total_max_attempts": 1},  # the caller's wrapper retries, with its own deadlines
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=max(32, 4 * self.part_concurrency),
                s3={"addressing_style": self.addressing_style} if self.addressing_style else None,
            )
            # Unset options stay None, so botocore reads the AWS_* variables and config files itself.
            session = AioSession(profile=self.profile)
            stack = AsyncExitStack()
            creating = session.create_client("s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config)
            client: S3Client = await stack.enter_async_context(creating)
            self._s3, self._stack = client, stack
            return client

    def _error(self, exc: BaseException, key: str) -> BlobStoreError:
        return _classify(exc)(f"{self.name}/{key}: {exc}")

    def _lock_args(self) -> dict[str, Any]:
        if not self.object_lock_days:
            return {}
        until = datetime.now(UTC) + timedelta(days=self.object_lock_days)
        return {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": until}

    async def put_file(self, key: str, source: Path) -> bool:
        """Racing writers of one key in this process queue behind the first, so its bytes are sent
        once and the rest find them with a HEAD; across processes the conditional write decides."""
        lock = self._writers.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                return await self._put_file(key, source)
        finally:
            if not lock.locked() and self._writers.get(key) is lock:
                del self._writers[key]

    async def _put_file(self, key: str, source: Path) -> bool:
        if await self.stat(key) is not None:
            return False  # content-addressed: the bytes are already there
        size = os.stat(source).st_size
        try:
            client = await self._client()
            if size < self.multipart_threshold:
                with open(source, "rb") as body:  # streamed by aiohttp, not read into memory
                    # An explicit checksum: Object Lock refuses PUTs without one, whatever the SDK's defaults.
                    await client.put_object(
                        Bucket=self.bucket, Key=self.prefix + key, Body=body, IfNoneMatch="*", ChecksumAlgorithm="CRC32",
                        **self._lock_args(),
                    )
            else:
                await self._put_multipart(client, self.prefix + key, source, size)
        except PROVIDER_ERRORS as exc:
            if _status(exc)[0] == 412:
                return False  # a racing writer of the same content won
            raise self._error(exc, key) from exc
        return True

    def part_size_for(self, size: int) -> int:
        """The configured part size, grown where needed to stay within S3's 10,000 parts."""
        return max(self.part_size, -(-size // MAX_PARTS))

    async def _put_multipart(self, client: "S3Client", full_key: str, source: Path, size: int) -> None:
        """Workers take part numbers in turn, so at most part_concurrency parts are in memory."""
        part_size = self.part_size_for(size)
        numbers = iter(range(1, -(-size // part_size) + 1))
        parts: list[CompletedPartTypeDef] = []
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=full_key, ChecksumAlgorithm="CRC32", **self._lock_args())
        upload_id = upload["UploadId"]

        async def worker() -> None:
            for number in numbers:
                data, crc = await asyncio.to_thread(_read_part, source, (number - 1) * part_size, part_size)
                response = await client.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=data, ChecksumCRC32=crc
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc})

        try:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(self.part_concurrency):
                        group.create_task(worker())
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            parts.sort(key=lambda part: part["PartNumber"])
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
            )
        except BaseException:
            # Also after a 412 or a cancellation: stored parts of an unfinished upload cost money.
            with suppress(*PROVIDER_ERRORS):
                await client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            raise

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            head = await (await self._client()).head_object(Bucket=self.bucket, Key=self.prefix + key)
        except PROVIDER_ERRORS as exc:
            error = self._error(exc, key)
            if isinstance(error, BlobNotFound):
                return None
            raise error from exc
        return BlobInfo(key, head["ContentLength"])

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        request: GetObjectRequestTypeDef = {"Bucket": self.bucket, "Key": self.prefix + key}
        if start or end is not None:  # no Range for a whole read: an empty blob has no valid range at all
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = await (await self._client()).get_object(**request)
        except PROVIDER_ERRORS as exc:
            if _status(exc)[0] == 416:
                return  # the range starts at or past the end (every range of an empty blob does): no bytes, like a file
            raise self._error(exc, key) from exc
        body = response["Body"]
        try:
            async for chunk in body.iter_chunks(CHUNK):
                yield chunk
        except PROVIDER_ERRORS as exc:
            raise self._error(exc, key) from exc
        finally:
            body.close()  # a reader that stops early must not leave the connection half-read in the pool

    async def delete(self, key: str) -> None:
        full_key = self.prefix + key
        try:
            client = await self._client()
            if not self.object_lock_days:
                await client.delete_object(Bucket=self.bucket, Key=full_key)
                return
            # A plain delete would only add a delete marker: remove every version of exactly this key.
            versions: list[str] = []
            async for page in client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=full_key):
                for entries in (page.get("Versions", []), page.get("DeleteMarkers", [])):
                    versions += [entry["VersionId"] for entry in entries if entry.get("Key") == full_key and "VersionId" in entry]
            for version in versions:
                await client.delete_object(Bucket=self.bucket, Key=full_key, VersionId=version, BypassGovernanceRetention=True)
        except PROVIDER_ERRORS as exc:
            raise self._error(exc, key) from exc

    async def list(self, prefix: str) -> AsyncIterator[str]:
        try:
            pages = (await self._client()).get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
            async for page in pages:
                for entry in page.get("Contents", []):
                    yield entry["Key"][len(self.prefix) :]
        except PROVIDER_ERRORS as exc:
            raise self._error(exc, prefix) from exc

    def local_path(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        async with self._lock:
            if self._stack is not None:
                await self._stack.aclose()
            self._s3, self._stack = None, None
