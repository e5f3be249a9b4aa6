"""In-memory blob store for tests: the same contract, no disk."""

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from versionstore.blobstore import BlobInfo, BlobNotFound, put_each


class MemoryBlobStore:
    name = "memory:"

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    async def put_files(self, items: Sequence[tuple[str, Path]]) -> list[bool]:
        return await put_each(self, items)

    async def put_file(self, key: str, source: Path) -> bool:
        if key in self._blobs:
            return False
        data = await asyncio.to_thread(source.read_bytes)
        return self._blobs.setdefault(key, data) is data

    async def stat(self, key: str) -> BlobInfo | None:
        data = self._blobs.get(key)
        return None if data is None else BlobInfo(key, len(data))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        data = self._blobs.get(key)
        if data is None:
            raise BlobNotFound(key)
        yield data[start:end]

    async def delete(self, key: str) -> None:
        self._blobs.pop(key, None)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        for key in sorted(self._blobs):
            if key.startswith(prefix):
                yield key

    def local_path(self, key: str) -> str | None:
        return None

    async def close(self) -> None:
        pass
