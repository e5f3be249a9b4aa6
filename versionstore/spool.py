"""Spool files: incoming bytes land here once, hashed as they pass.

Two digests per upload: BLAKE3 is the content address (blob names, dedup, verification) and
MD5 is Cloudinary's `etag`, which clients compare with a local MD5. The chunks received are
collected as they are (no copy), or lent as whole blocks by a caller that received them into
its own buffers (`write_block`, http/body_tap.py), and queued once per ~4 MiB block on two
lanes (spool_lanes.py): one hashes with BLAKE3 and writes, the other hashes with MD5 (all
three release the GIL). Each lane drains its queue in order on one worker thread, beside the
receipt of the next blocks and without waiting for the other lane; only the memory bound,
`IN_FLIGHT` blocks handed over, holds the receipt back. An upload then costs about the slowest
of receiving, MD5, and BLAKE3 + write, not their sum: on two cores MD5, the serial hash, sets
the pace. Memory per upload is bounded by `IN_FLIGHT + 1` blocks.

The written bytes are also flushed to the device while the upload is still arriving (an
`fdatasync` on a third thread per `SYNC_EVERY` bytes, never waited for by the receipt): the
durable `fsync` before any store links the file then finds almost nothing left to flush. On
this project's virtual disks one fsync at the end waited about 2 s per GiB with every CPU idle,
a third of the upload's wall time (docs/performance.md, "The final fsync"). Each flushed range
is then dropped from the page cache, which cuts the write lane's CPU (docs/performance.md,
"The deep pipeline").

Whole pages of page-aligned blocks at page-aligned offsets (the tap's blocks, cut that way by
http/body_tap.py) skip the page cache altogether: the write lane writes them with `O_DIRECT`,
which costs a fraction of the system CPU of a buffered write and leaves no dirty page to write
back or drop (docs/performance.md, "Direct writes"). Nothing about durability changes: the
final fsync still precedes every link and every commit that names the file.
"""

import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import io
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from versionstore.durable import fsync_path
from versionstore.errors import TooLarge
from versionstore.spool_lanes import Lane, Timeline

BLOCK = 1 << 20
#: Bytes collected before a hand-off to the lanes (one completion per lane per block, so larger
#: blocks mean fewer hand-offs); IN_FLIGHT blocks in flight bound the memory of an upload.
HANDOFF = 4 << 20
#: Blocks handed to the lanes and not yet done in both. Four: each lane takes the next block
#: the moment it finishes one, so MD5 (the serial hash, the upload's pace on two cores) keeps
#: going while the write lane stalls on the page cache or the disk, for up to three blocks.
#: Memory: IN_FLIGHT + 1 blocks (20 MiB for a tapped upload).
IN_FLIGHT = 4
HEAD = 64
#: Bytes written between two background `fdatasync`s: small enough that the final fsync finds
#: little left, large enough that the flushes cost nothing measurable beside the receipt.
SYNC_EVERY = 32 << 20
#: Seconds after which an unlocked staging file (`.new`) is a crash's leftover.
STAGING_AGE = 60.0
#: Direct I/O (Linux): whole pages of page-aligned chunks at page-aligned offsets, from chunks
#: of DIRECT_MIN bytes on (the tap's blocks; a small chunk is cheaper through the page cache).
O_DIRECT = getattr(os, "O_DIRECT", 0)
PAGE = mmap.PAGESIZE
DIRECT_MIN = 1 << 20


class Hashes:
    """The digests of one byte stream: BLAKE3 (content address) and MD5 (Cloudinary's etag),
    fed from two worker threads (each hasher is used by one thread at a time), so the upload
    runs at the pace of the slower hash, not of both in series."""

    def __init__(self) -> None:
        self._blake3 = blake3.blake3()
        self._md5 = hashlib.md5(usedforsecurity=False)

    def update_blake3(self, data: bytes | memoryview) -> None:
        self._blake3.update(data)

    def update_md5(self, data: bytes | memoryview) -> None:
        self._md5.update(data)

    def update_md5_all(self, chunks: Sequence[bytes | memoryview]) -> None:
        for chunk in chunks:
            self._md5.update(chunk)  # releases the GIL for inputs over 2 KiB

    @property
    def blake3(self) -> str:
        return self._blake3.hexdigest()

    @property
    def md5(self) -> str:
        return self._md5.hexdigest()


@dataclass(frozen=True)
class Spooled:
    path: Path
    size: int
    digest: str  # BLAKE3, hex: the content address
    head: bytes
    #: False when `finish(sync=False)` left the fsync to the consumer (see make_durable).
    synced: bool = True
    #: MD5, hex: Cloudinary's `etag` (None from producers that did not compute it).
    md5: str | None = None
    #: A read-only handle holding the spool file's lock until this object is dropped, so no
    #: other process's start-up removes the file while its upload still needs it.
    lock: Any = field(default=None, compare=False, repr=False)


async def make_durable(spooled: Spooled) -> None:
    """fsync a spool file finished without it. Must complete before the file is linked into a
    local store (a name must never point at bytes a crash could lose) and before any metadata
    names it; a copy to a remote bucket only reads the file and need not wait for it."""
    if not spooled.synced:
        await asyncio.to_thread(fsync_path, spooled.path)


class SpoolFile:
    """Append-only temp file with running BLAKE3 and MD5; `finish()` fsyncs and returns both.
    Without `md5` there is no MD5 lane (`Spooled.md5` is None): for bytes whose MD5 nobody
    reads, like an archive sent for import (each member's MD5 is checked by verification) or a
    blob copied from a remote store to be read locally."""

    def __init__(self, directory: Path, limit: int, *, md5: bool = True) -> None:
        name = secrets.token_hex(12)
        self.path = directory / f"{name}.part"
        self.limit = limit
        self.size = 0
        self.head = b""
        self.hashes = Hashes()
        self.with_md5 = md5
        self._timeline = Timeline.from_env()
        # Two lanes (spool_lanes.py), each taking the blocks in order on a thread of its own
        # while there are any: BLAKE3 + write, and MD5 (None when off). Neither waits for the
        # other; `_in_flight` holds each block's two completions, oldest first, and bounds memory.
        self._write_lane = Lane("write", self._timeline)
        self._md5_lane = Lane("md5", self._timeline) if md5 else None
        self._in_flight: collections.deque[tuple[asyncio.Future[None], asyncio.Future[None] | None]] = collections.deque()
        self._syncing: asyncio.Future[None] | None = None
        self._unsynced = 0
        # Bytes the write lane has written (it alone adds to it), and the start of the range
        # whose pages no flush has dropped from the page cache yet.
        self._written = 0
        self._dropped = 0
        # A background flush's failure, raised by `finish`: Linux reports a writeback error to
        # one fsync per open file only, so the final fsync would not see it again.
        self._sync_error: OSError | None = None
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        # How many workers use the file (writing a block, flushing it), and whether it was
        # discarded meanwhile: then the last of them removes it (`discard` never waits for them).
        self._state = threading.Lock()
        self._busy = 0
        self._discarded = False
        self._handle, self._lock = _create(directory, name)
        # The write lane's O_DIRECT descriptor (`_write_direct`): None until the first chunk
        # that can use it, False when the file system refuses it or the file is done.
        self._direct: int | bool | None = None if O_DIRECT else False

    async def write(self, data: bytes) -> None:
        self._count(data)
        # Collect the chunks as they are (no concatenation: copying on the event loop was
        # the upload path's largest cost) and hand them off per block.
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= HANDOFF:
            await self._flush()

    async def write_block(self, block: memoryview) -> None:
        """Hand `block` to the workers now, without a copy. The caller lends it: it must not
        change until `IN_FLIGHT` more `write_block` calls (or `finish`) have returned, which
        first wait for the workers to be done with it; a caller rotating `IN_FLIGHT + 1`
        buffers never waits for more."""
        self._count(block)
        self._pending.append(block)
        await self._flush()

    def when_workers_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop once no worker can touch a block handed over so
        far, whatever happened to the upload (done, failed, cancelled, discarded): a marker job
        queued behind them on each lane, which runs (or, after a failure, is skipped) only once
        the lane is past every earlier job. Not the blocks' own futures: cancelling a waiter
        cancels its future while the worker may still read the block."""
        lanes = [lane for lane in (self._write_lane, self._md5_lane) if lane is not None]
        left = len(lanes)

        def passed(_: asyncio.Future[None]) -> None:
            nonlocal left
            left -= 1
            if not left:
                callback()

        for lane in lanes:
            lane.submit(_marker, []).add_done_callback(passed)

    def _count(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        _check_size(self.size, self.limit)
        if len(self.head) < HEAD:
            self.head += bytes(data[: HEAD - len(self.head)])

    async def _flush(self) -> None:
        chunks, self._pending, self._pending_size = self._pending, [], 0
        if chunks:
            while len(self._in_flight) >= IN_FLIGHT:  # bounded memory; a lent block is free again
                await self._oldest_done()
            md5 = self._md5_lane.submit(self._md5_chunks, chunks) if self._md5_lane is not None else None
            self._in_flight.append((self._write_lane.submit(self._write_chunks, chunks), md5))
            self._unsynced += sum(len(chunk) for chunk in chunks)
            if self._unsynced >= SYNC_EVERY and (self._syncing is None or self._syncing.done()):
                # Flushes what earlier blocks wrote; the receipt never waits for it.
                self._unsynced = 0
                self._syncing = _started(self._datasync, [])

    async def _oldest_done(self) -> None:
        started = time.monotonic()
        try:
            await _both(self._in_flight.popleft())
        finally:
            if self._timeline is not None:
                self._timeline.record("loop_wait", started, time.monotonic())

    async def _in_flight_done(self) -> None:
        while self._in_flight:
            await self._oldest_done()
        if self._syncing is not None:
            syncing, self._syncing = self._syncing, None
            await syncing

    def _write_chunks(self, chunks: list[bytes | memoryview]) -> None:
        if not self._enter():
            return
        try:
            for chunk in chunks:
                self.hashes.update_blake3(chunk)  # releases the GIL for large inputs
                self._write_at(memoryview(chunk), self._written)
                self._written += len(chunk)
        finally:
            self._leave()

    def _write_at(self, view: memoryview, offset: int) -> None:
        """Whole pages of a page-aligned chunk at a page-aligned offset go past the page cache
        (`_write_direct`); everything else, and all of it where direct I/O is refused, is a
        plain write. Positional, so the two file descriptors never disagree on the offset."""
        if len(view) >= DIRECT_MIN and offset % PAGE == 0 and self._direct is not False and _page_aligned(view):
            done = self._write_direct(view[: len(view) - len(view) % PAGE], offset)
            view, offset = view[done:], offset + done
        fd = self._handle.fileno()
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def _write_direct(self, view: memoryview, offset: int) -> int:
        """Bytes of `view` written with O_DIRECT (whole pages), 0 when the file system refuses
        it: then this file goes on with plain writes. Nothing stays in the page cache to write
        back or drop, which saves the write lane most of its system CPU (docs/performance.md,
        "Direct writes"); the final fsync still makes the bytes and the file's size durable."""
        if self._direct is None:
            try:  # the same file, whatever its name: opened through the descriptor we hold
                self._direct = os.open(f"/proc/self/fd/{self._handle.fileno()}", os.O_WRONLY | O_DIRECT)
            except OSError:
                self._direct = False
                return 0
        assert type(self._direct) is int
        done = 0
        try:
            while done < len(view) and done % PAGE == 0:
                done += os.pwrite(self._direct, view[done:], offset + done)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
            self._close_direct(False)  # an alignment this file system does not accept: plain writes from here
        return done

    def _md5_chunks(self, chunks: list[bytes | memoryview]) -> None:
        if not self._discarded:  # a discarded upload's MD5 is never read
            self.hashes.update_md5_all(chunks)

    def _datasync(self, _: list[bytes | memoryview]) -> None:
        """Flush what was written so far, then drop those pages from the page cache (they are
        clean now, and nothing reads them during the upload): writing into a page cache that
        keeps every page cost the write lane 0.3-0.4 s more CPU per GiB in the upload benchmark
        (docs/performance.md, "The deep pipeline"). A failure is kept for `finish` to raise."""
        if not self._enter():
            return
        started, cpu = time.monotonic(), time.thread_time()
        try:
            upto = self._written  # written before the flush starts: clean once it returns
            os.fdatasync(self._handle.fileno())
            if upto > self._dropped:
                with contextlib.suppress(OSError):  # only advice: the bytes are safe either way
                    os.posix_fadvise(self._handle.fileno(), self._dropped, upto - self._dropped, os.POSIX_FADV_DONTNEED)
                self._dropped = upto
        except OSError as error:
            self._sync_error = error
        finally:
            self._leave()
            if self._timeline is not None:
                self._timeline.record("sync", started, time.monotonic(), time.thread_time() - cpu)

    def _enter(self) -> bool:
        """A worker starts using the file, unless it was discarded."""
        with self._state:
            if self._discarded:
                return False
            self._busy += 1
            return True

    def _leave(self) -> None:
        with self._state:
            self._busy -= 1
            last = self._discarded and not self._busy
        if last:
            self._remove()

    async def finish(self, sync: bool = True) -> Spooled:
        """Flush and close; with `sync` also fsync (else the consumer calls make_durable)."""
        await self._flush()
        await self._in_flight_done()
        if self._sync_error is not None:
            raise self._sync_error
        started = time.monotonic()
        await asyncio.to_thread(self._close, sync)
        if self._timeline is not None:
            self._timeline.record("close", started, time.monotonic())
            self._timeline.write(self.size)
        md5 = self.hashes.md5 if self.with_md5 else None
        return Spooled(self.path, self.size, self.hashes.blake3, self.head, synced=sync, md5=md5, lock=self._lock)

    def _close(self, sync: bool) -> None:
        self._close_direct(None)
        if sync:  # durable before any store links it and before any metadata names it
            os.fsync(self._handle.fileno())
        self._handle.close()

    def _close_direct(self, then: bool | None) -> None:
        """Close the O_DIRECT descriptor, if open; `then` is what `_direct` becomes (False: no
        more direct writes to this file)."""
        if type(self._direct) is int:  # an open descriptor, not a bool
            os.close(self._direct)
        self._direct = then

    def discard(self) -> None:
        """Remove the file now, or, while a worker writes a block, as soon as that block is done."""
        with self._state:
            self._discarded = True
            busy = self._busy > 0
        if not busy:
            self._remove()

    def _remove(self) -> None:
        self._close_direct(False)
        self._handle.close()
        self.path.unlink(missing_ok=True)
        self._lock.close()


def _check_size(size: int, limit: int) -> None:
    if size > limit:
        raise TooLarge(f"File size too large. Got {size}. Maximum is {limit}.")


def _create(directory: Path, name: str) -> tuple[io.FileIO, io.BufferedReader]:
    """(an unbuffered write handle, a read handle holding the lock) of a new `NAME.part`.
    Unbuffered: blocks are already large, and Python's buffer would add a copy. Created and
    locked under a staging name, then renamed: a `.part` file is locked from its first moment
    until its upload is done with it (see remove_stale_parts)."""
    staging = directory / f"{name}.new"
    handle = open(staging, "xb", buffering=0)
    lock = open(staging, "rb")
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(staging, directory / f"{name}.part")
    return handle, lock


async def spool_bytes(directory: Path, limit: int, data: bytes, sync: bool) -> Spooled:
    """A body already in memory (a small upload, http/small_body.py) as a spool file, in one
    worker-thread call: create, write, both digests and, with `sync`, the fsync. `SpoolFile`
    takes three thread hops and a file creation on the event loop for the same result, which
    is most of the loop's spool cost for a 1 KiB upload (docs/performance.md)."""
    _check_size(len(data), limit)
    return await asyncio.to_thread(_spool_now, directory, data, sync)


def _spool_now(directory: Path, data: bytes, sync: bool) -> Spooled:
    name = secrets.token_hex(12)
    path = directory / f"{name}.part"
    handle, lock = _create(directory, name)
    try:
        with handle:
            view = memoryview(data)
            while view:
                view = view[handle.write(view) :]
            if sync:  # durable before any store links it and before any metadata names it
                os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        lock.close()
        raise
    md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return Spooled(path, len(data), blake3.blake3(data).hexdigest(), data[:HEAD], synced=sync, md5=md5, lock=lock)


async def _both(block: tuple[asyncio.Future[None], asyncio.Future[None] | None]) -> None:
    """Wait for both lanes of a block (the MD5 lane may be off); the first failure is raised
    after both are done."""
    first, second = block
    try:
        await first
    finally:
        if second is not None:
            await asyncio.wait([second])
    if second is not None:
        await second


def _started(work: Callable[[list[bytes | memoryview]], None], chunks: list[bytes | memoryview]) -> asyncio.Future[None]:
    """`work(chunks)` on a worker thread; a failure nobody awaits any more (the upload was
    discarded) is not logged as never retrieved."""
    future = asyncio.ensure_future(asyncio.to_thread(work, chunks))
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


async def hash_file(path: Path) -> tuple[str, bytes]:
    """BLAKE3 digest and head of a finished file (verification of a stored blob)."""

    def run() -> tuple[str, bytes]:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        hasher.update_mmap(str(path))
        with open(path, "rb") as handle:
            head = handle.read(HEAD)
        return hasher.hexdigest(), head

    return await asyncio.to_thread(run)


def remove_stale_parts(directory: Path) -> int:
    """Remove spool files a crashed process left: a `.part` file that no process holds locked
    (a live one is locked from creation until its upload is done), and a `.new` staging file
    (locked within microseconds of its creation) a minute old and unlocked. Another process's
    upload in flight is never touched. Blocking: run it in a thread. Returns how many went."""
    removed = 0
    cutoff = time.time() - STAGING_AGE
    for path in [*directory.glob("*.part"), *directory.glob("*.new")]:
        try:
            with open(path, "rb") as handle:
                if path.suffix == ".new" and os.fstat(handle.fileno()).st_mtime >= cutoff:
                    continue
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use by a live process
                path.unlink(missing_ok=True)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _page_aligned(view: memoryview) -> bool:
    """Whether the chunk's first byte starts a page (the tap's blocks are `mmap`s, so they do);
    a read-only buffer, whose address ctypes will not give, counts as not aligned."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view)) % PAGE == 0
    except (TypeError, ValueError):
        return False


def _marker(_: list[bytes | memoryview]) -> None:
    """A lane job doing nothing: it runs once the lane is past every earlier job (when_workers_done)."""
