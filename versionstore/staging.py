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
import fcntl
import hashlib
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
#: Buffers a Stager rotates: the reader fills one while the others are in (or wait for) the
#: MD5 and write lanes, so the reader runs up to RING - 1 blocks ahead of the slower lane.
RING = 4
#: MD5s the blocks of staged files in order (one worker), beside their BLAKE3 and their write.
_MD5_THREAD = ThreadPoolExecutor(1, thread_name_prefix="staged-md5")


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
    """A file being staged, as its write lane sees it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.synced = BackgroundSync(handle.fileno())
        self.error: BaseException | None = None

    def write(self, data: memoryview) -> None:
        if self.error is not None:
            return
        try:
            _write_all(self.handle, data)
            self.synced.wrote(len(data))
        except BaseException as error:
            self.error = error
            raise

    def finish(self, durable: "Future[None]") -> None:
        """After the file's last block: its fsync and close on a sync thread, then `durable`."""
        _SYNC_THREADS.submit(self._sync_and_close).add_done_callback(lambda done: _settle(durable, done))

    def _sync_and_close(self) -> None:
        try:
            if self.error is not None:
                raise self.error
            self.synced.finish(sync=True)
        finally:
            self.handle.close()


def _settle(target: "Future[None]", done: "Future[None]") -> None:
    error = done.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(None)


class Stager:
    """Stages files one after another (an archive import's members), each block read once into
    one of RING reused buffers and hashed with BLAKE3 on the caller's thread, with MD5 on the
    MD5 lane and written on the write lane, both in order: the reader never waits for the MD5
    of the block it just read (the serial hash sets the pace on two cores: its lane always has
    the next block waiting) nor for a write, and memory stays RING blocks. Files are named and
    locked like spool files (`<random>.part`); without `lock` a private directory's owner
    locks them as a whole. Blocking: run it in one worker thread; `drain()` on every way out."""

    def __init__(self, directory: Path, *, lock: bool = True) -> None:
        self.directory, self.lock = directory, lock
        self._buffers = [bytearray(STAGE_BLOCK) for _ in range(RING)]
        self._lanes: list[list[Future[None]]] = [[] for _ in range(RING)]
        self._turn = 0

    def stage(self, readinto: Callable[[memoryview], int], size: int, *, md5: bool) -> Staged:
        """Exactly `size` bytes that `readinto` gives (it raises on a short source) in a new
        file, with its BLAKE3 and, with `md5`, its MD5. Not fsynced yet: see Staged.durable."""
        name = secrets.token_hex(12)
        staging, path = self.directory / f"{name}.new", self.directory / f"{name}.part"
        handle = open(staging, "xb", buffering=0)
        held = open(staging, "rb") if self.lock else None
        file = _File(handle)
        hasher = blake3.blake3()  # one thread: the MD5 lane has the other core
        md5_hasher = hashlib.md5(usedforsecurity=False) if md5 else None
        head, left = b"", size
        try:
            if held is not None:
                fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, path)
            while left:
                buffer = self._free_buffer()
                got = readinto(memoryview(buffer)[: min(STAGE_BLOCK, left)])
                if not got:
                    raise OSError(f"{path.name}: the source ended {left} bytes early")
                data = memoryview(buffer)[:got]
                hasher.update(data)
                lanes = [_WRITE_THREAD.submit(file.write, data)]
                if md5_hasher is not None:
                    lanes.append(_MD5_THREAD.submit(md5_hasher.update, data))
                self._lanes[self._turn] = lanes
                self._turn = (self._turn + 1) % RING
                if len(head) < HEAD:
                    head += bytes(data[: HEAD - len(head)])
                left -= got
        except BaseException:
            self.drain()  # no block of this file in flight once it goes
            handle.close()
            for leftover in (staging, path):
                leftover.unlink(missing_ok=True)
            if held is not None:
                held.close()
            raise
        durable: Future[None] = Future()
        _WRITE_THREAD.submit(file.finish, durable)
        digest = _MD5_THREAD.submit(md5_hasher.hexdigest) if md5_hasher is not None else None
        return Staged(path, size, hasher.hexdigest(), head, digest, durable, held)

    def _free_buffer(self) -> bytearray:
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
