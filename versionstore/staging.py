"""Blob files written for a batch (an archive import), and flushing a file while it grows.

A staged file is hashed (BLAKE3) as it is written and flushed to the device in the
background while it grows, so the fsync its batch makes before any store links it
(`spool.make_durable`) finds little left to write. It has no MD5 pass unless asked: an
archive's verified manifest already says the MD5 of the bytes its BLAKE3 names. Named and
locked like spool files (`<random>.part`, locked from its first moment), so the spool's
stale-file cleanup removes a crash's leftovers and never a live one.
"""

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import blake3

from versionstore.durable import fsync_path
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


def stage(directory: Path, read: Callable[[], bytes], md5: str | None, *, digest: str | None = None, lock: bool = True) -> Spooled:
    """Write what `read()` returns (until b"") to a new spool file. Blocking: run it in a worker
    thread. The MD5 is `md5` when the caller knows it, else computed on the way; the BLAKE3
    likewise (`digest`: a caller whose `read` hashes what it returns, and checks it). Without
    `lock` the file is not locked: for a private directory its owner locks as a whole. The
    file is not fsynced (`synced=False`): the batch makes it durable before linking it."""
    name = secrets.token_hex(12)
    staging, path = directory / f"{name}.new", directory / f"{name}.part"
    handle = open(staging, "xb", buffering=0)
    held = open(staging, "rb") if lock else None
    writing: Future[None] | None = None
    try:
        if held is not None:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, path)
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if digest is None else None
        md5_hasher = hashlib.md5(usedforsecurity=False) if md5 is None else None
        synced = BackgroundSync(handle.fileno())
        size, head = 0, b""
        while data := read():
            if hasher is not None:
                hasher.update(data)
            if md5_hasher is not None:
                md5_hasher.update(data)
            # Written on another thread while the next block is read and hashed: at most one
            # block in flight, so the file gets its blocks in order and memory stays two blocks.
            if writing is not None:
                writing.result()
            writing = write_soon(handle, data)
            size += len(data)
            synced.wrote(len(data))
            if len(head) < HEAD:
                head += data[: HEAD - len(head)]
        if writing is not None:
            writing.result()
        synced.finish(sync=False)
        handle.close()
    except BaseException:
        if writing is not None:
            writing.exception()  # the block in flight is done with the file before it closes
        handle.close()
        for leftover in (staging, path):
            leftover.unlink(missing_ok=True)
        if held is not None:
            held.close()
        raise
    return Spooled(
        path, size, digest or (hasher.hexdigest() if hasher else ""), head, synced=False,
        md5=md5 if md5_hasher is None else md5_hasher.hexdigest(), lock=held,
    )


def write_soon(handle: IO[bytes], data: bytes | memoryview) -> "Future[None]":
    """All of `data` written to `handle` on the write thread; the caller keeps `data` unchanged
    and waits for the future before its next write to the file and before closing it."""
    return _WRITE_THREAD.submit(_write_all, handle, data)


def _write_all(handle: IO[bytes], data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view) or 0 :]


def flush_soon(path: Path) -> "Future[None]":
    """The file's fsync, started now on a worker thread (a finished staged file: the device
    writes it while the next one is staged); the caller waits for it before linking the file."""
    return _SYNC_THREADS.submit(fsync_path, path)


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
