"""Blob files written for a batch (an archive import), and flushing a file while it grows.

A `Stager` writes an import's members one after another into spool files: each block is read
once into a reused buffer, hashed with BLAKE3 on the reading thread, with MD5 on its own lane
(only when asked: an archive's verified manifest already says the MD5 of the bytes its BLAKE3
names) and written on the write lane, so the serial MD5 always has the next block waiting;
each file's fsync starts as soon as its last block is written, and its batch waits for all of
them (`Staged.durable`) before any store links one. Files are named and locked like spool
files (`<random>.part`, locked from their first moment), so the spool's stale-file cleanup
removes a crash's leftovers and never a live one.
"""

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import blake3

from versionstore.spool import HEAD, Spooled

#: Bytes written between two background flushes of a file being written.
SYNC_EVERY = 32 << 20
_SYNC_THREADS = ThreadPoolExecutor(2, thread_name_prefix="background-sync")
#: Writes the blocks of staged files (in order per file: one worker) beside their hashing.
_WRITE_THREAD = ThreadPoolExecutor(1, thread_name_prefix="staged-write")


class BackgroundSync:
    """`fdatasync` of a file being written, every SYNC_EVERY bytes, on a worker thread the
    writer does not wait for; `finish` waits for it and then fsyncs what is left. On this
    project's virtual disks one fsync at the end of a large file waited ~2 s per GiB with
    every CPU idle; flushed as it grows, the file's last fsync finds little to write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._unsynced = 0
        self._flushing: Future[None] | None = None

    def wrote(self, size: int) -> None:
        self._unsynced += size
        if self._unsynced >= SYNC_EVERY and (self._flushing is None or self._flushing.done()):
            self._unsynced = 0
            self._flushing = _SYNC_THREADS.submit(_advisory_datasync, self.fd)

    def finish(self, sync: bool = True) -> None:
        """Wait for the flush in flight; with `sync`, the file's durable fsync."""
        if self._flushing is not None:
            self._flushing.result()
            self._flushing = None
        if sync:
            os.fsync(self.fd)


def _advisory_datasync(fd: int) -> None:
    """A failure here (a full disk) surfaces in the final fsync, which is the guarantee."""
    with contextlib.suppress(OSError):
        os.fdatasync(fd)


#: Bytes per block a Stager reads, hashes and writes (as archive_format.READ).
STAGE_BLOCK = 4 << 20
#: Block writes of staged files in flight at once. Positioned writes, so their order does not
#: matter; with O_DIRECT each waits for the device, and several keep its queue busy.
WRITES_IN_FLIGHT = 3
#: Buffers a Stager rotates: the reader fills one while the others are hashed (MD5) or written,
#: so the reader runs ahead of the slower lane by up to RING - 1 blocks.
RING = WRITES_IN_FLIGHT + 3
#: O_DIRECT writes need offsets, lengths and memory aligned to the device's block size; 4 KiB
#: covers every common one (the buffers are page-aligned, the last block is padded and the file
#: truncated back to its size).
ALIGN = 4096
#: MD5s the blocks of staged files in order (one worker), beside their BLAKE3 and their write.
_MD5_THREAD = ThreadPoolExecutor(1, thread_name_prefix="staged-md5")
_BLOCK_WRITERS = ThreadPoolExecutor(WRITES_IN_FLIGHT, thread_name_prefix="staged-write")


@dataclass
class Staged:
    """A file a Stager wrote. Its BLAKE3 is known once its last block was read; its MD5 (when
    asked) once the MD5 lane is done with it, and `durable` once it is written, closed and
    fsynced (the fsync starts as soon as its last block is written)."""

    path: Path
    size: int
    blake3: str
    head: bytes
    md5: "Future[str] | None"
    durable: "Future[None]"
    lock: IO[bytes] | None = None

    def spooled(self, md5: str | None = None) -> Spooled:
        """As a durable spool file, once `durable` is done (`md5`: the one the caller knows,
        else the computed one, which is waited for)."""
        return Spooled(
            self.path, self.size, self.blake3, self.head, synced=True,
            md5=md5 if md5 is not None else self.md5.result() if self.md5 is not None else None, lock=self.lock,
        )

    def discard(self) -> None:
        """Remove the file once its lanes are done with it (on every way out of its owner)."""
        with contextlib.suppress(Exception):
            self.durable.result()
        self.path.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.close()


class _File:
    """A file being staged: its block writes (positioned, on the writer threads) and, once the
    last is submitted, its end: truncated to its size, fsynced and closed on a sync thread."""

    def __init__(self, fd: int, direct: bool) -> None:
        self.fd, self.direct = fd, direct
        self.writes: list[Future[None]] = []

    def write(self, data: memoryview, offset: int) -> "Future[None]":
        written = _BLOCK_WRITERS.submit(_pwrite_all, self.fd, data, offset)
        self.writes.append(written)
        return written

    def finish(self, size: int) -> "Future[None]":
        return _SYNC_THREADS.submit(self._end, size)

    def abort(self) -> None:
        """Close it without making it durable (it is about to be removed)."""
        for written in self.writes:
            written.exception()
        os.close(self.fd)

    def _end(self, size: int) -> None:
        try:
            for written in self.writes:
                written.result()
            if self.direct and size % ALIGN:
                os.ftruncate(self.fd, size)  # the padding of the last block goes
            os.fsync(self.fd)
        finally:
            for written in self.writes:
                written.exception()  # none still writes when the file closes
            os.close(self.fd)


def _fill(readinto: Callable[[memoryview], int], view: memoryview) -> int:
    """Read until `view` is full or the source ends (a short read mid-file would leave the next
    O_DIRECT write unaligned)."""
    filled = 0
    while filled < len(view) and (got := readinto(view[filled:])):
        filled += got
    return filled


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class Stager:
    """Stages files one after another (an archive import's members), each block read once into
    one of RING reused buffers and hashed with BLAKE3 on the caller's thread, with MD5 on the
    MD5 lane (in order) and written by the block writers (positioned writes, several in
    flight): the reader never waits for the MD5 of the block it just read (the serial hash
    sets the pace on two cores: its lane always has the next block waiting) nor for a write,
    and memory stays RING blocks. Files are written with O_DIRECT where the file system takes
    it (a buffered write cost this VM ~1.3-2.3 s of system CPU per GiB, CPU that MD5 and
    BLAKE3 need; docs/snapshots.md, "Cost"), else through the page cache. Named and locked
    like spool files (`<random>.part`); without `lock` a private directory's owner locks them
    as a whole. Blocking: run it in one worker thread at a time; `drain()` on every way out."""

    def __init__(self, directory: Path, *, lock: bool = True, direct: bool = True) -> None:
        self.directory, self.lock, self.direct = directory, lock, direct
        self._buffers = [mmap.mmap(-1, STAGE_BLOCK) for _ in range(RING)]  # page-aligned
        self._lanes: list[list[Future[None]]] = [[] for _ in range(RING)]
        self._turn = 0

    def _open(self, path: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.direct = False  # this file system does not take it (tmpfs)
        return os.open(path, flags, 0o666)

    def stage(self, readinto: Callable[[memoryview], int], size: int, *, md5: bool) -> Staged:
        """Exactly `size` bytes that `readinto` gives (it raises on a short source) in a new
        file, with its BLAKE3 and, with `md5`, its MD5. Not fsynced yet: see Staged.durable."""
        name = secrets.token_hex(12)
        staging, path = self.directory / f"{name}.new", self.directory / f"{name}.part"
        fd = self._open(staging)
        held = open(staging, "rb") if self.lock else None
        file = _File(fd, self.direct)
        hasher = blake3.blake3()  # one thread: the MD5 lane has the other core
        md5_hasher = hashlib.md5(usedforsecurity=False) if md5 else None
        head, offset = b"", 0
        try:
            if held is not None:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, path)
            while offset < size:
                buffer = self._free_buffer()
                got = _fill(readinto, memoryview(buffer)[: min(STAGE_BLOCK, size - offset)])
                if not got:
                    raise OSError(f"{path.name}: the source ended {size - offset} bytes early")
                data = memoryview(buffer)[:got]
                hasher.update(data)
                lanes = [file.write(self._padded(buffer, got), offset)]
                if md5_hasher is not None:
                    lanes.append(_MD5_THREAD.submit(md5_hasher.update, data))
                self._lanes[self._turn] = lanes
                self._turn = (self._turn + 1) % RING
                if len(head) < HEAD:
                    head += bytes(data[: HEAD - len(head)])
                offset += got
        except BaseException:
            self.drain()  # no block of this file in flight once it goes
            file.abort()
            for leftover in (staging, path):
                leftover.unlink(missing_ok=True)
            if held is not None:
                held.close()
            raise
        durable = file.finish(size)
        digest = _MD5_THREAD.submit(md5_hasher.hexdigest) if md5_hasher is not None else None
        return Staged(path, size, hasher.hexdigest(), head, digest, durable, held)

    def _padded(self, buffer: mmap.mmap, got: int) -> memoryview:
        """The block to write: with O_DIRECT a short last block is zero-padded to ALIGN (the
        file is truncated back once written)."""
        if not self.direct or got % ALIGN == 0:
            return memoryview(buffer)[:got]
        end = min(STAGE_BLOCK, -(-got // ALIGN) * ALIGN)
        buffer[got:end] = bytes(end - got)
        return memoryview(buffer)[:end]

    def _free_buffer(self) -> mmap.mmap:
        """The next buffer, once both lanes are done with the block it held."""
        for lane in self._lanes[self._turn]:
            lane.result()
        self._lanes[self._turn] = []
        return self._buffers[self._turn]

    def drain(self) -> None:
        """Wait until no lane uses a buffer (failures were raised to `stage` already, or are
        the file's, seen by its `durable`)."""
        for lanes in self._lanes:
            for lane in lanes:
                lane.exception()
        self._lanes = [[] for _ in range(RING)]


def write_soon(handle: IO[bytes], data: bytes | memoryview) -> "Future[None]":
    """All of `data` written to `handle` on the write thread; the caller keeps `data` unchanged
    and waits for the future before its next write to the file and before closing it."""
    return _WRITE_THREAD.submit(_write_all, handle, data)


def _write_all(handle: IO[bytes], data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view) or 0 :]


class PrivateDirectory:
    """A directory of staged files only its owner uses (an archive import staging everything
    before it commits): one lock for the directory instead of one open file per staged file.
    Made under a hidden name and renamed once locked, so `remove_stale` never sees it unlocked
    while its owner lives."""

    def __init__(self, parent: Path, prefix: str) -> None:
        name = f"{prefix}{secrets.token_hex(12)}"
        making = parent / f".{name}.new"
        making.mkdir()
        self._lock = open(making / LOCK, "xb")
        fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = parent / name
        os.rename(making, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


LOCK = "lock"


def remove_stale(parent: Path, prefix: str) -> int:
    """Remove private directories (`prefix*`) whose owner is gone (its lock is free). Blocking."""
    removed = 0
    for directory in parent.glob(f"{prefix}*"):
        try:
            with open(directory / LOCK, "rb") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        except BlockingIOError:
            continue  # its owner is alive
        except FileNotFoundError:
            shutil.rmtree(directory, ignore_errors=True)  # gone meanwhile, or never locked (renamed only once locked)
    return removed
