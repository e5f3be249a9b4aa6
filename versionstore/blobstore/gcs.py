"""Google Cloud Storage blob store (google-cloud-storage).

The library is synchronous, so every call runs in a bounded thread pool owned by the store and
never on the event loop. Its built-in retries are off: one retry policy lives in the caller, and
a second one underneath would multiply attempts and hide outages. Google errors never leave this
module; they become BlobNotFound, TransientStoreError or PermanentStoreError.
"""

import asyncio
import base64
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
from google.api_core.exceptions import GoogleAPIError, NotFound, PreconditionFailed, ServerError, TooManyRequests, from_http_response
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import GoogleAuthError, TransportError
from google.cloud import storage  # type: ignore[import-untyped]  # the package ships no py.typed
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse  # type: ignore[import-untyped]

from versionstore.blobstore import BlobInfo, BlobNotFound, BlobStoreError, PermanentStoreError, StoreURL, TransientStoreError, put_each
from versionstore.blobstore.file_range import FileRange, pieces

T = TypeVar("T")

MIB = 1 << 20
MAX_SIMPLE = 32 * MIB  # the largest resumable_threshold: one-request uploads hold their body in memory
PIECE = MIB  # bytes per read of a download: one in flight, one being sent on
TIMEOUT = (10, 60)  # (connect, read) seconds per HTTP request; the library's default is a flat 60
OPTIONS = frozenset({"endpoint_url", "anonymous", "project", "credentials_file", "chunk_size", "resumable_threshold", "workers"})
_TRANSIENT = (TooManyRequests, ServerError, TransportError, DataCorruption, OSError)  # OSError: requests' errors too
_PERMANENT = (GoogleAPIError, GoogleAuthError, InvalidResponse)


class GCSBlobStore:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        anonymous: bool = False,
        project: str | None = None,
        credentials_file: str | None = None,
        chunk_size: int = 32 * MIB,
        resumable_threshold: int = 8 * MIB,  # smaller bodies go in one request, held in memory by the library
        workers: int = 8,
    ) -> None:
        if chunk_size <= 0 or chunk_size % (256 * 1024):
            raise ValueError(f"GCS chunk_size must be a positive multiple of 256 KiB, not {chunk_size}")
        if workers < 1 or resumable_threshold < 0:
            raise ValueError("GCS workers must be >= 1 and resumable_threshold >= 0")
        if resumable_threshold > MAX_SIMPLE:  # a tenant may set it: it must not buy whole bodies in memory
            raise ValueError(f"GCS resumable_threshold must be at most {MAX_SIMPLE} (smaller bodies are held in memory), "
                             f"not {resumable_threshold}")
        if anonymous and credentials_file:
            raise ValueError("GCS options anonymous and credentials_file exclude each other")
        self.name = f"gs://{bucket}/{prefix}".rstrip("/")
        self._bucket_name, self._prefix = bucket, prefix
        self._endpoint_url, self._anonymous, self._project, self._credentials_file = endpoint_url, anonymous, project, credentials_file
        self._chunk_size, self._threshold = chunk_size, resumable_threshold
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gcs")
        self._lock = threading.Lock()
        self._client_obj: Any = None
        self._bucket_obj: Any = None

    @classmethod
    def from_url(cls, location: StoreURL) -> "GCSBlobStore":
        options = dict(location.options)
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ValueError(f"Unknown option(s) for {location.scheme}://{location.bucket}: {', '.join(unknown)}")
        if options.get("anonymous", "false") not in ("true", "false"):
            raise ValueError(f"GCS option anonymous must be true or false, not {options['anonymous']!r}")
        sizes = {name: int(options[name]) for name in ("chunk_size", "resumable_threshold", "workers") if name in options}
        return cls(
            location.bucket, location.prefix, endpoint_url=options.get("endpoint_url"), anonymous=options.get("anonymous") == "true",
            project=options.get("project"), credentials_file=options.get("credentials_file"), **sizes,
        )

    # --- running library calls in the pool ------------------------------------------------------

    def _bucket(self) -> Any:
        """The client is built on first use, in a pool thread: building it may read files or probe for credentials."""
        with self._lock:
            if self._bucket_obj is None:
                try:
                    self._client_obj = self._new_client()
                except (GoogleAuthError, OSError, ValueError) as exc:  # bad configuration: retrying will not help
                    raise PermanentStoreError(f"{self.name}: cannot create a GCS client: {exc}") from exc
                self._bucket_obj = self._client_obj.bucket(self._bucket_name)
            return self._bucket_obj

    def _new_client(self) -> Any:
        kwargs: dict[str, Any] = {}
        if self._endpoint_url:
            kwargs["client_options"] = {"api_endpoint": self._endpoint_url}
        if self._project is not None or self._anonymous:
            kwargs["project"] = self._project  # None with anonymous: no project, and no lookup of a default one
        if self._anonymous:
            kwargs["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call]
        if self._credentials_file:
            return storage.Client.from_service_account_json(self._credentials_file, **kwargs)
        return storage.Client(**kwargs)

    def _submit(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._result(self._submit(fn, *args))

    async def _result(self, future: Awaitable[T]) -> T:
        try:
            return await future
        except BlobStoreError:
            raise
        except _TRANSIENT as exc:
            raise TransientStoreError(f"{self.name}: {exc}") from exc
        except _PERMANENT as exc:  # 4xx other than the NotFound handled by each operation, auth failures
            raise PermanentStoreError(f"{self.name}: {exc}") from exc

    # --- the BlobStore contract ----------------------------------------------------------------

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        return await put_each(self, items)

    async def put_file(self, key: str, source: Path) -> bool:
        return await self._run(self._put_file, self._prefix + key, source)

    def _put_file(self, name: str, source: Path) -> bool:
        # The existence check saves uploading bytes that are already there (the common case for
        # content-addressed keys); if_generation_match=0 makes the write itself create-only.
        if self._bucket().get_blob(name, timeout=TIMEOUT, retry=None) is not None:
            return False
        blob = self._bucket().blob(name)
        with open(source, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                if size >= self._threshold:
                    self._put_resumable(blob, handle.fileno(), size)
                else:  # one request; the library holds the body (below the threshold) in memory
                    blob.upload_from_file(handle, size=size, if_generation_match=0, timeout=TIMEOUT, retry=None)
            except PreconditionFailed:
                return False
        return True

    def _put_resumable(self, blob: Any, fd: int, size: int) -> None:
        """A resumable upload sent chunk_size bytes per request, each chunk streamed from the file
        (`FileRange`): the library's own sender reads every chunk into memory whole, and the
        allocator kept those blocks (+83-86 MiB RSS for a 128 MiB upload). The known size lets the
        server finish on the last chunk; its CRC32C goes with the last chunk, and the stored
        object's CRC32C is checked too (an emulator may not check the header)."""
        crc = 0
        for piece in pieces(fd, 0, size):
            crc = google_crc32c.extend(crc, bytes(piece))  # the C extension takes bytes only
        expected = base64.b64encode(crc.to_bytes(4, "big")).decode()
        url = blob.create_resumable_upload_session(size=size, if_generation_match=0, checksum=None, timeout=TIMEOUT, retry=None)
        http = self._bucket().client._http  # the client's authorized requests session
        offset = 0
        while True:
            length = min(self._chunk_size, size - offset)
            headers = {"Content-Range": f"bytes {offset}-{offset + length - 1}/{size}" if length else f"bytes */{size}"}
            if offset + length == size:
                headers["X-Goog-Hash"] = f"crc32c={expected}"
            response = http.put(url, data=FileRange(fd, offset, length), headers=headers, timeout=TIMEOUT)
            if response.status_code in (200, 201):
                self._check_stored(blob, response.json(), expected)
                return
            if response.status_code != 308:  # "resume incomplete": the server wants the next chunk
                raise from_http_response(response)  # type: ignore[no-untyped-call]  # 412 is PreconditionFailed: the object already exists
            persisted = response.headers.get("Range", "")  # "bytes=0-N": what the server kept so far
            done = int(persisted.rsplit("-", 1)[1]) + 1 if persisted else 0
            if done <= offset:
                raise TransientStoreError(f"{self.name}: resumable upload of {blob.name!r} made no progress at byte {offset}")
            offset = done

    def _check_stored(self, blob: Any, resource: dict[str, Any], expected: str) -> None:
        stored = resource.get("crc32c")
        if stored and stored != expected:
            with contextlib.suppress(NotFound):  # exactly the generation written here, never a racing writer's
                blob.bucket.delete_blob(blob.name, generation=resource.get("generation"), timeout=TIMEOUT, retry=None)
            raise TransientStoreError(f"{self.name}: {blob.name!r} was stored with CRC32C {stored}, not {expected}: removed")

    async def stat(self, key: str) -> BlobInfo | None:
        blob = await self._run(self._get_blob, self._prefix + key)
        return None if blob is None else BlobInfo(key, int(blob.size or 0))

    def _get_blob(self, name: str) -> Any:
        return self._bucket().get_blob(name, timeout=TIMEOUT, retry=None)  # None when missing

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        # The metadata call gives the size and the media link, which names this generation.
        blob = await self._run(self._get_blob, self._prefix + key)
        if blob is None:
            raise BlobNotFound(key)
        size = int(blob.size or 0)
        stop = size if end is None else min(end, size)
        if start >= stop:
            return
        # One streamed GET, read PIECE bytes per pool task with the next piece always in flight:
        # the network and the client's reading overlap, memory stays two pieces whatever the size,
        # and no thread waits on a slow reader (ranged GETs of 8 MiB grew RSS by ~40 MiB).
        response = await self._run(self._open_range, blob, key, start, stop)
        wanted = stop - start
        pending: asyncio.Future[bytes] | None = self._submit(response.raw.read, min(PIECE, wanted))
        try:
            while pending is not None:
                data = await self._result(pending)
                if not data:
                    raise TransientStoreError(f"{self.name}: short read of {key!r}: {stop - start - wanted} of {stop - start} bytes")
                wanted -= len(data)
                pending = self._submit(response.raw.read, min(PIECE, wanted)) if wanted > 0 else None
                yield data
        finally:
            if pending is not None:
                pending.cancel()  # an abandoned read: a running read finishes in its thread
            with contextlib.suppress(RuntimeError):  # the store was closed meanwhile
                self._pool.submit(response.close)  # back to the pool, or dropped if half-read

    def _open_range(self, blob: Any, key: str, start: int, stop: int) -> Any:
        # Accept-Encoding gzip and decode_content=False: the stored bytes, never transcoded.
        headers = {"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "gzip"}
        client = self._bucket().client
        link = str(blob._get_download_url(client))  # as the library's own downloads: the media link, user_project
        if blob.generation and "generation=" not in link:  # GCS's media links name it; an emulator's may not
            link += f"{'&' if '?' in link else '?'}generation={blob.generation}"
        response = client._http.get(link, headers=headers, stream=True, timeout=TIMEOUT)
        # 200 is the whole object: right only for a range that starts at 0 (a server that
        # ignored the Range header would otherwise have its first bytes taken for `start`'s).
        if response.status_code == 206 or (response.status_code == 200 and start == 0):
            response.raw.decode_content = False
            return response
        response.close()
        if response.status_code == 404:
            raise BlobNotFound(key)  # deleted while being read
        if response.status_code == 200:
            raise TransientStoreError(f"{self.name}: the server ignored the range of {key!r} (bytes {start}-{stop - 1})")
        raise from_http_response(response)  # type: ignore[no-untyped-call]

    async def delete(self, key: str) -> None:
        await self._run(self._delete, self._prefix + key)

    def _delete(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._bucket().delete_blob(name, timeout=TIMEOUT, retry=None)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        pages = await self._run(self._pages, self._prefix + prefix)
        skip = len(self._prefix)
        while (names := await self._run(_next_page, pages)) is not None:
            for name in names:
                yield name[skip:]

    def _pages(self, prefix: str) -> Any:
        return self._bucket().client.list_blobs(self._bucket_name, prefix=prefix, timeout=TIMEOUT, retry=None).pages

    def local_path(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        if self._client_obj is not None:
            await self._run(self._client_obj.close)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _next_page(pages: Any) -> list[str] | None:
    """One listing request. None at the end: StopIteration cannot cross a future."""
    page = next(pages, None)
    return None if page is None else [blob.name for blob in page]
