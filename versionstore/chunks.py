"""Chunked uploads (`upload_large`): chunks land at their offsets in one spool file per upload.

Sessions are keyed by the client's `X-Unique-Upload-Id` and their received ranges are kept in
the metadata store, so an interrupted upload can continue after a service restart. Python
sends the real total on every chunk; Node sends `/-1` until the last one. When the ranges
cover [0, total) the file is hashed once (BLAKE3 multi-threaded and MD5 beside it, from the page cache) and
handed to the normal upload path.
"""

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from versionstore.errors import BadRequest, TooLarge
from versionstore.locks import KeyedLocks
from versionstore.metadata import MetadataStore
from versionstore.spool import BLOCK, Spooled, hash_file_both

_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(-1|\d+)$")
SESSION_TTL = 24 * 3600
ORPHAN_CHUNK_AGE = 3600


@dataclass(frozen=True)
class ChunkRange:
    start: int
    end: int  # exclusive
    total: int | None


def parse_content_range(header: str) -> ChunkRange:
    match = _CONTENT_RANGE.match(header.strip())
    if not match:
        raise BadRequest(f"Invalid Content-Range header - {header}")
    start, last, total = int(match[1]), int(match[2]), int(match[3])
    if last < start or (total >= 0 and last >= total):
        raise BadRequest(f"Invalid Content-Range header - {header}")
    return ChunkRange(start, last + 1, None if total < 0 else total)


def _merge(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    merged: list[list[int]] = []
    for lo, hi in sorted([*ranges, [start, end]]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


class ChunkAssembler:
    def __init__(self, meta: MetadataStore, directory: Path, max_bytes: int) -> None:
        self.meta = meta
        self.directory = directory
        self.max_bytes = max_bytes
        self._locks = KeyedLocks()

    def _path(self, cloud: str, upload_id: str) -> Path:
        return self.directory / f"{cloud}--{upload_id}.chunks"

    async def write(
        self, cloud: str, upload_id: str, chunk: ChunkRange, body: AsyncIterator[bytes]
    ) -> tuple[Spooled | None, int]:
        """Store one chunk. Returns (the whole file when complete, bytes received so far)."""
        if not _UPLOAD_ID.match(upload_id):
            raise BadRequest("Invalid X-Unique-Upload-Id header")
        if chunk.end > self.max_bytes or (chunk.total or 0) > self.max_bytes:
            raise TooLarge(f"File size too large. Maximum is {self.max_bytes}.")
        path = self._path(cloud, upload_id)
        written = await self._write_at(path, chunk, body)
        async with self._locks.hold((cloud, upload_id)):
            session = await self.meta.get_upload_session(cloud, upload_id)
            total, ranges = session if session else (None, [])
            total = chunk.total if chunk.total is not None else total
            ranges = _merge(ranges, chunk.start, chunk.start + written)
            received = sum(hi - lo for lo, hi in ranges)
            if total is not None and ranges == [[0, total]]:
                await self.meta.delete_upload_session(cloud, upload_id)
                hashes, head = await hash_file_both(path)
                return Spooled(path, total, hashes.blake3, head, md5=hashes.md5), received
            await self.meta.save_upload_session(cloud, upload_id, total, ranges)
            return None, received

    async def _write_at(self, path: Path, chunk: ChunkRange, body: AsyncIterator[bytes]) -> int:
        expected = chunk.end - chunk.start
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT, 0o600)
        written = 0
        buffer = bytearray()
        try:
            async for data in body:
                buffer += data
                if written + len(buffer) > expected:
                    raise BadRequest("Chunk is larger than its Content-Range")
                if len(buffer) >= BLOCK:
                    await asyncio.to_thread(os.pwrite, fd, bytes(buffer), chunk.start + written)
                    written += len(buffer)
                    buffer.clear()
            if buffer:
                await asyncio.to_thread(os.pwrite, fd, bytes(buffer), chunk.start + written)
                written += len(buffer)
            if written != expected:
                raise BadRequest(f"Chunk has {written} bytes but its Content-Range says {expected}")
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
        return written

    async def sweep(self) -> None:
        """Forget sessions idle for a day, with their partial files, and remove chunk files
        that never got a session (a first chunk refused after its file was created)."""
        cutoff = time.time() - SESSION_TTL
        for cloud, upload_id in await self.meta.stale_upload_sessions(cutoff):
            self._path(cloud, upload_id).unlink(missing_ok=True)
            await self.meta.delete_upload_session(cloud, upload_id)
        for path in self.directory.glob("*--*.chunks"):
            cloud, _, upload_id = path.name[: -len(".chunks")].partition("--")
            idle = path.stat().st_mtime < time.time() - ORPHAN_CHUNK_AGE
            if idle and await self.meta.get_upload_session(cloud, upload_id) is None:
                path.unlink(missing_ok=True)
