"""The blob-store interface: one small contract every backend implements.

Two roles use it: the primary store (current originals) and the backup store (write-once
revisions). Keys come from `versionstore.layout`; backends never invent key names.
"""

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit


class BlobStoreError(Exception):
    """Base of the errors a backend raises; callers never parse provider errors."""


class BlobNotFound(BlobStoreError):
    pass


class TransientStoreError(BlobStoreError):
    """Worth retrying (timeouts, 5xx, connection resets)."""


class PermanentStoreError(BlobStoreError):
    """Retrying will not help (permissions, missing bucket)."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int


class BlobStore(Protocol):
    name: str

    async def put_file(self, key: str, source: Path) -> bool:
        """Store the file's bytes under `key`, create-only.

        Returns True when written, False when the key already existed: keys name their
        content, so "already exists" is success. The source file is left in place.
        """
        ...

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        """`put_file` of each (key, source), as one step: a local store links them all, then
        makes each directory they went into durable once (one fsync per directory, not one
        per blob; `put_each` for the others). All are durable when it returns."""
        ...

    async def stat(self, key: str) -> BlobInfo | None: ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of the blob; raises BlobNotFound."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""
        ...

    def list(self, prefix: str) -> AsyncIterator[str]: ...

    def local_path(self, key: str) -> str | None:
        """A path the HTTP layer may sendfile from, when the backend is a local disk."""
        ...

    async def close(self) -> None:
        """Release clients, connection pools and worker threads."""
        ...


async def put_each(store: BlobStore, items: Sequence[tuple[str, Path]]) -> list[bool]:
    """`put_files` as one `put_file` per item, all at once (a remote store: each is a request)."""
    return list(await asyncio.gather(*(store.put_file(key, source) for key, source in items)))


@dataclass(frozen=True)
class StoreURL:
    """A parsed store location: `s3://bucket/prefix?region=eu-west-1&endpoint_url=...`.

    `prefix` is "" or ends with "/"; `options` are the per-store overrides of the SDK's
    environment variables (endpoint, region, profile, ...), documented in docs/operations.md.
    """

    scheme: str  # file | memory | s3 | gs
    bucket: str  # the directory for file
    prefix: str = ""
    options: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> "StoreURL":
        """The same bucket without the prefix: where `.wellknown/` markers live."""
        return StoreURL(self.scheme, self.bucket, "", self.options)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        base = f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/") if self.scheme in ("s3", "gs") else self.bucket
        return f"{base}?{query}" if query else base


def parse_store_url(url: str) -> StoreURL:
    if url.startswith("memory:"):
        return StoreURL("memory", url[len("memory:") :])
    if url.startswith("file://"):
        return StoreURL("file", url[len("file://") :])
    if url.startswith(("/", ".")):
        return StoreURL("file", url)
    parts = urlsplit(url)
    if parts.scheme in ("s3", "gs"):
        if not parts.netloc:
            raise ValueError(f"Blob store {url!r} names no bucket")
        prefix = parts.path.strip("/")
        if any(segment in ("", ".", "..") for segment in prefix.split("/")) and prefix:
            raise ValueError(f"Blob store {url!r} has an invalid prefix")
        return StoreURL(parts.scheme, parts.netloc, prefix + "/" if prefix else "", dict(parse_qsl(parts.query)))
    raise ValueError(f"Unsupported blob store {url!r} (expected a path, file://, s3://, gs:// or memory:)")


def open_store(url: str | StoreURL) -> BlobStore:
    """Pick a backend from one URL-like string: `/path`, `file:///path`, `s3://`, `gs://` or `memory:`."""
    location = url if isinstance(url, StoreURL) else parse_store_url(url)
    if location.scheme == "memory":
        from versionstore.blobstore.memory import MemoryBlobStore

        return MemoryBlobStore()
    if location.scheme == "file":
        from versionstore.blobstore.local import LocalBlobStore

        return LocalBlobStore(Path(location.bucket))
    if location.scheme == "s3":
        from versionstore.blobstore.s3 import S3BlobStore

        return S3BlobStore.from_url(location)
    from versionstore.blobstore.gcs import GCSBlobStore

    return GCSBlobStore.from_url(location)
