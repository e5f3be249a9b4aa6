"""The blob-store interface: one small contract every backend implements.

Two roles use it: the primary store (current originals) and the backup store (write-once
revisions). Keys come from `versionstore.layout`; backends never invent key names.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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


def open_store(url: str) -> BlobStore:
    """Pick a backend from one URL-like string: `/path`, `file:///path` or `memory:`."""
    from versionstore.blobstore.local import LocalBlobStore
    from versionstore.blobstore.memory import MemoryBlobStore

    if url.startswith("memory:"):
        return MemoryBlobStore()
    if url.startswith("file://"):
        return LocalBlobStore(Path(url[len("file://") :]))
    if url.startswith("/") or url.startswith("."):
        return LocalBlobStore(Path(url))
    raise ValueError(f"Unsupported blob store {url!r} (expected a path, file:// or memory:)")
