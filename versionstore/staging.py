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
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import blake3

from versionstore.spool import HEAD, Spooled

#: Bytes written between two background flushes of a file being written.
SYNC_EVERY = 32 << 20
_SYNC_THREADS = ThreadPoolExecutor(2, thread_name_prefix="background-sync")


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


def stage(directory: Path, read: Callable[[], bytes], md5: str | None) -> Spooled:
    """Write what `read()` returns (until b"") to a new locked spool file. Blocking: run it in
    a worker thread. The MD5 is `md5` when the caller knows it, else computed on the way. The
    file is not fsynced (`synced=False`): the batch makes it durable before linking it."""
    name = secrets.token_hex(12)
    staging, path = directory / f"{name}.new", directory / f"{name}.part"
    handle = open(staging, "xb", buffering=0)
    lock = open(staging, "rb")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, path)
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        md5_hasher = hashlib.md5(usedforsecurity=False) if md5 is None else None
        synced = BackgroundSync(handle.fileno())
        size, head = 0, b""
        while data := read():
            hasher.update(data)
            if md5_hasher is not None:
                md5_hasher.update(data)
            view = memoryview(data)
            while view:
                view = view[handle.write(view) or 0 :]
            size += len(data)
            synced.wrote(len(data))
            if len(head) < HEAD:
                head += data[: HEAD - len(head)]
        synced.finish(sync=False)
        handle.close()
    except BaseException:
        handle.close()
        for leftover in (staging, path):
            leftover.unlink(missing_ok=True)
        lock.close()
        raise
    digest = hasher.hexdigest()
    return Spooled(path, size, digest, head, synced=False, md5=md5 if md5_hasher is None else md5_hasher.hexdigest(), lock=lock)
