"""S3 (and S3-compatible) blob store on aiobotocore.

Write-once rests on conditional writes: `If-None-Match: *` on PutObject and on
CompleteMultipartUpload, so racing writers of one key cannot replace each other's bytes.
Retries and deadlines belong to the caller's wrapper, so botocore's own retries are off, and
every provider error leaves this module as a BlobStoreError.
"""

import asyncio
import base64
import os
import secrets
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import AioSession  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, FlexibleChecksumError, HTTPClientError, IncompleteReadError  # type: ignore[import-untyped]

from versionstore.blobstore import BlobInfo, BlobNotFound, BlobStoreError, PermanentStoreError, StoreURL, TransientStoreError, put_each
from versionstore.blobstore.file_range import FileRange, pieces

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
#: Tries of a staged put's abort (StagedPut.abort).
ABORT_ATTEMPTS = 3


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


def _part_crc(fd: int, offset: int, length: int) -> str:
    """Base64 CRC32 of one part, read from the file in small pieces (run off the event loop)."""
    crc = 0
    for piece in pieces(fd, offset, length):
        crc = zlib.crc32(piece, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


class S3BlobStore:
    def __init__(self, bucket: str, prefix: str = "", options: dict[str, str] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ValueError(f"Unknown S3 store option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTIONS))})")
        self.bucket, self.prefix = bucket, prefix
        self.name = f"s3://{bucket}/{prefix}".rstrip("/")
        self.part_size = _option_int(options, "part_size", 16 * MiB, 1)  # streamed from the file: not a memory cost
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

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        return await put_each(self, items)

    async def put_file(self, key: str, source: Path) -> bool:
        """Racing writers of one key in this process queue behind the first, so its bytes are sent
        once and the rest find them with a HEAD; across processes the conditional write decides."""
        async with self._writer(key):
            return await self._put_file(key, source)

    @asynccontextmanager
    async def _writer(self, key: str) -> AsyncIterator[None]:
        """One writer of `key` at a time in this process (put_file and staged puts alike)."""
        lock = self._writers.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                yield
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
        """Workers take part numbers in turn, so at most part_concurrency parts are in flight,
        each streamed from the file (`FileRange`): memory per upload does not grow with part_size."""
        part_size = self.part_size_for(size)
        numbers = iter(range(1, -(-size // part_size) + 1))
        parts: list[CompletedPartTypeDef] = []
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=full_key, ChecksumAlgorithm="CRC32", **self._lock_args())
        upload_id = upload["UploadId"]

        async def worker(fd: int) -> None:
            for number in numbers:
                offset = (number - 1) * part_size
                length = min(part_size, size - offset)
                crc = await asyncio.to_thread(_part_crc, fd, offset, length)
                response = await client.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=FileRange(fd, offset, length),
                    ChecksumCRC32=crc,
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc})

        try:
            try:
                with open(source, "rb") as file:
                    async with asyncio.TaskGroup() as group:
                        for _ in range(self.part_concurrency):
                            group.create_task(worker(file.fileno()))
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

    # --- staged put: parts go up while the body arrives, published at the digest key later ---

    async def stage(self, under: str, size_hint: int | None = None) -> "StagedPut":
        """Start a staged put under `under` (e.g. `<cloud>/staging/`; a random name is added).

        The caller writes the body as it arrives, then `publish(key)`es it once the content's
        digest is known, or `abort()`s. Nothing is ever written at `key` before `publish`, and
        `publish` makes it visible only after the staged bytes were checked (docs/buckets.md).
        """
        part_size = self.part_size_for(size_hint) if size_hint else self.part_size
        return StagedPut(self, await self._client(), self.prefix + under + secrets.token_hex(16), part_size)

    async def collect_staging(self, under: str, older_than: float) -> int:
        """Remove what staged puts abandoned under `under` (a killed process): unfinished
        multipart uploads and staging objects started more than `older_than` seconds ago.
        Returns how many were removed."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        removed = 0
        try:
            client = await self._client()
            async for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix + under):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        with suppress(ClientError):  # finished or aborted meanwhile
                            await client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                            removed += 1
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + under):
                for entry in page.get("Contents", []):
                    if entry["LastModified"] < cutoff:
                        await client.delete_object(Bucket=self.bucket, Key=entry["Key"])
                        removed += 1
        except PROVIDER_ERRORS as exc:
            raise self._error(exc, under) from exc
        return removed

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


def _crc(data: bytes | bytearray | memoryview) -> bytes:
    return zlib.crc32(data).to_bytes(4, "big")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class StagedPut:
    """One staged put (`S3BlobStore.stage`): the body's parts are uploaded to a random staging
    key while it arrives; `publish(key)` then copies them server-side into a create-only
    multipart upload at `key`.

    What makes it safe:
    - nothing exists at `key` until the final CompleteMultipartUpload (with `If-None-Match: *`),
      and that runs only after the staged object was checked: its size, its composite CRC32
      against the CRC32s of the bytes this process was given, and each copied part's ETag
      against the staged part's;
    - a body smaller than one part is never staged: it stays in memory and goes up with one
      conditional PutObject at `publish`;
    - `abort()` (also on every error, and on cancellation) aborts the staging upload and deletes
      the staging object; what a killed process leaves is removed by `collect_staging` and by the
      bucket lifecycle rule docs/buckets.md recommends.
    """

    def __init__(self, store: S3BlobStore, client: "S3Client", staging_key: str, part_size: int) -> None:
        self.store, self.client, self.staging_key, self.part_size = store, client, staging_key, part_size
        self.buffer = bytearray()
        self.size = 0
        self.upload_id: str | None = None
        self.parts: dict[int, tuple[str, bytes]] = {}  # part number -> (ETag, raw CRC32)
        self.tasks: list[asyncio.Task[None]] = []  # one per part sent
        self.staged_object = False  # the staging upload was completed: an object to delete
        self.closed = False
        self.slots = asyncio.Semaphore(store.part_concurrency)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the body; full parts go up in the background, at most
        `part_concurrency` at a time (this waits when that many are in flight)."""
        if self.closed:
            raise PermanentStoreError(f"{self.store.name}: staged put already finished")
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= self.part_size:
            part = bytes(self.buffer[: self.part_size])
            del self.buffer[: self.part_size]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        self._raise_failed()
        try:
            if self.upload_id is None:
                created = await self.client.create_multipart_upload(
                    Bucket=self.store.bucket, Key=self.staging_key, ChecksumAlgorithm="CRC32"
                )
                self.upload_id = created["UploadId"]
            await self.slots.acquire()
        except PROVIDER_ERRORS as exc:
            raise self.store._error(exc, self.staging_key) from exc
        self.tasks.append(asyncio.ensure_future(self._upload_part(len(self.tasks) + 1, part)))

    async def _upload_part(self, number: int, part: bytes) -> None:
        try:
            crc = await asyncio.to_thread(_crc, part)
            assert self.upload_id is not None
            response = await self.client.upload_part(
                Bucket=self.store.bucket, Key=self.staging_key, UploadId=self.upload_id, PartNumber=number, Body=part,
                ChecksumCRC32=_b64(crc),
            )
            self.parts[number] = (response["ETag"], crc)
        finally:
            self.slots.release()

    def _raise_failed(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                raise self.store._error(exc, self.staging_key) from exc

    async def _drain(self) -> None:
        if pending := [task for task in self.tasks if not task.done()]:
            await asyncio.wait(pending)
        self._raise_failed()

    async def publish(self, key: str) -> bool:
        """Make the staged bytes the object `key`, create-only. True when written, False when `key`
        already existed (its bytes are the same by construction). The staging upload is removed
        either way; on any error nothing is left at `key` and the error is raised."""
        if self.closed:
            raise PermanentStoreError(f"{self.store.name}: staged put already finished")
        async with self.store._writer(key):
            return await self._publish(key)

    async def _publish(self, key: str) -> bool:
        full_key = self.store.prefix + key
        try:
            if await self.store.stat(key) is not None:
                return False  # content-addressed: the bytes are already there
            if self.upload_id is None:  # smaller than one part: never staged
                await self.client.put_object(
                    Bucket=self.store.bucket, Key=full_key, Body=bytes(self.buffer), IfNoneMatch="*", ChecksumAlgorithm="CRC32",
                    **self.store._lock_args(),
                )
                return True
            if self.buffer:
                await self._send(bytes(self.buffer))
                self.buffer.clear()
            await self._drain()
            await self._complete_staging()
            await self._copy_to(full_key)
            return True
        except PROVIDER_ERRORS as exc:
            if _status(exc)[0] == 412:
                return False  # a racing writer of the same content won
            raise self.store._error(exc, key) from exc
        finally:
            await self.abort()

    async def _complete_staging(self) -> None:
        numbers = sorted(self.parts)
        assert self.upload_id is not None and numbers == list(range(1, len(numbers) + 1))
        await self.client.complete_multipart_upload(
            Bucket=self.store.bucket, Key=self.staging_key, UploadId=self.upload_id,
            MultipartUpload={"Parts": [
                {"PartNumber": n, "ETag": self.parts[n][0], "ChecksumCRC32": _b64(self.parts[n][1])} for n in numbers
            ]},
        )
        self.upload_id, self.staged_object = None, True
        head = await self.client.head_object(Bucket=self.store.bucket, Key=self.staging_key, ChecksumMode="ENABLED")
        composite = _b64(_crc(b"".join(self.parts[n][1] for n in numbers)))
        reported = str(head.get("ChecksumCRC32") or "").split("-")[0]  # S3 adds "-<parts>"; moto does not
        if head["ContentLength"] != self.size or (reported and reported != composite):
            raise PermanentStoreError(
                f"{self.store.name}: staged object has {head['ContentLength']} bytes, CRC32 {reported or '?'}; "
                f"expected {self.size}, {composite}: not published"
            )

    async def _copy_to(self, full_key: str) -> None:
        """Server-side copy of the staged parts, same boundaries, into a conditional multipart upload."""
        client, bucket = self.client, self.store.bucket
        created = await client.create_multipart_upload(Bucket=bucket, Key=full_key, ChecksumAlgorithm="CRC32", **self.store._lock_args())
        upload_id = created["UploadId"]
        try:
            copied: list[CompletedPartTypeDef] = []
            for number in sorted(self.parts):
                start = (number - 1) * self.part_size
                end = min(start + self.part_size, self.size) - 1
                response = await client.upload_part_copy(
                    Bucket=bucket, Key=full_key, UploadId=upload_id, PartNumber=number,
                    CopySource={"Bucket": bucket, "Key": self.staging_key}, CopySourceRange=f"bytes={start}-{end}",
                )
                etag, crc = self.parts[number]
                if response["CopyPartResult"].get("ETag") != etag:
                    raise PermanentStoreError(f"{self.store.name}: part {number} was copied with other bytes: not published")
                copied.append({"PartNumber": number, "ETag": etag, "ChecksumCRC32": _b64(crc)})
            await client.complete_multipart_upload(
                Bucket=bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": copied}, IfNoneMatch="*"
            )
        except BaseException:
            with suppress(*PROVIDER_ERRORS):
                await client.abort_multipart_upload(Bucket=bucket, Key=full_key, UploadId=upload_id)
            raise

    async def abort(self) -> None:
        """Give up: nothing at the digest key, and the staging upload or object removed. Idempotent.

        Parts in flight are waited for, not cancelled: a cancelled request may still be
        running at the server (or leave half a body on a pooled connection that the next
        request, the abort, then follows), and S3 says an upload aborted while parts are
        arriving may need aborting again. The abort is retried a few times for the same
        reason; what still fails is left to `collect_staging` and the lifecycle rule."""
        self.closed = True
        self.buffer = bytearray()
        if pending := [task for task in self.tasks if not task.done()]:
            await asyncio.wait(pending)
        for attempt in range(ABORT_ATTEMPTS):
            try:
                if self.upload_id is not None:
                    await self.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.staging_key, UploadId=self.upload_id)
                    self.upload_id = None
                if self.staged_object:
                    await self.client.delete_object(Bucket=self.store.bucket, Key=self.staging_key)
                    self.staged_object = False
                return
            except PROVIDER_ERRORS as exc:
                if _status(exc)[1] == "NoSuchUpload":
                    self.upload_id = None  # gone already: only the staged object may be left
                elif attempt + 1 < ABORT_ATTEMPTS:
                    await asyncio.sleep(0.05 * (attempt + 1))
