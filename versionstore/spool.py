"""Spool files: incoming bytes land here once, hashed with BLAKE3 as they pass.

Chunks are handed to a worker thread about every 1 MiB, which hashes and writes them (BLAKE3
and write(2) release the GIL), so the event loop keeps serving while a large upload streams
in. Memory per upload is bounded by the block size.
"""

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import blake3

from versionstore.errors import TooLarge

BLOCK = 1 << 20
HEAD = 64


@dataclass(frozen=True)
class Spooled:
    path: Path
    size: int
    digest: str
    head: bytes
    #: False when `finish(sync=False)` left the fsync to the consumer (see make_durable).
    synced: bool = True


async def make_durable(spooled: Spooled) -> None:
    """fsync a spool file finished without it. Must complete before the file is linked into a
    local store (a name must never point at bytes a crash could lose) and before any metadata
    names it; a copy to a remote bucket reads the page cache and need not wait for it."""
    if not spooled.synced:

        def sync() -> None:
            fd = os.open(spooled.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(sync)


class SpoolFile:
    """Append-only temp file with a running BLAKE3; `finish()` fsyncs and returns the digest."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.path = directory / f"{secrets.token_hex(12)}.part"
        self.limit = limit
        self.size = 0
        self.head = b""
        self._hasher = blake3.blake3()
        self._pending: list[bytes] = []
        self._pending_size = 0
        # Unbuffered: blocks are already large, and Python's buffer would add a copy.
        self._handle = open(self.path, "xb", buffering=0)

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"File size too large. Got {self.size}. Maximum is {self.limit}.")
        if len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
        # Collect the chunks as they are (no concatenation: copying on the event loop was
        # the upload path's largest cost) and hand them to a worker thread per ~1 MiB.
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        chunks, self._pending, self._pending_size = self._pending, [], 0
        if chunks:
            await asyncio.to_thread(self._write_chunks, chunks)

    def _write_chunks(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)  # releases the GIL for large inputs
            view = memoryview(chunk)
            while view:
                view = view[self._handle.write(view) :]

    async def finish(self, sync: bool = True) -> Spooled:
        """Flush and close; with `sync` also fsync (else the consumer calls make_durable)."""
        await self._flush()
        await asyncio.to_thread(self._close, sync)
        return Spooled(self.path, self.size, self._hasher.hexdigest(), self.head, synced=sync)

    def _close(self, sync: bool) -> None:
        if sync:  # durable before any store links it and before any metadata names it
            os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.path.unlink(missing_ok=True)


async def hash_file(path: Path) -> tuple[str, bytes]:
    """Digest and head of a finished file (used for out-of-order chunk assembly)."""

    def run() -> tuple[str, bytes]:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(str(path))
        with open(path, "rb") as handle:
            head = handle.read(HEAD)
        return hasher.hexdigest(), head

    return await asyncio.to_thread(run)
