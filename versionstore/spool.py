"""Spool files: incoming bytes land here once, hashed with BLAKE3 as they pass.

Writes are batched into 1 MiB blocks and done, together with hashing, in a worker thread
(BLAKE3 releases the GIL), so the event loop keeps serving while a large upload streams in.
Memory per upload is bounded by the block size.
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


class SpoolFile:
    """Append-only temp file with a running BLAKE3; `finish()` fsyncs and returns the digest."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.path = directory / f"{secrets.token_hex(12)}.part"
        self.limit = limit
        self.size = 0
        self.head = b""
        self._hasher = blake3.blake3()
        self._buffer = bytearray()
        self._handle = open(self.path, "xb")

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise TooLarge(f"File size too large. Got {self.size}. Maximum is {self.limit}.")
        if len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
        self._buffer += data
        if len(self._buffer) >= BLOCK:
            await self._flush()

    async def _flush(self) -> None:
        block, self._buffer = bytes(self._buffer), bytearray()
        await asyncio.to_thread(self._write_block, block)

    def _write_block(self, block: bytes) -> None:
        self._hasher.update(block)
        self._handle.write(block)

    async def finish(self) -> Spooled:
        await self._flush()
        await asyncio.to_thread(self._sync_close)
        return Spooled(self.path, self.size, self._hasher.hexdigest(), self.head)

    def _sync_close(self) -> None:
        self._handle.flush()
        # Durable before any store links it and before any metadata names it.
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
