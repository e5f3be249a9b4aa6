"""The spool file flushes to the device while an upload arrives (SpoolFile's background
`fdatasync`, then the flushed pages dropped from the page cache), and what that must never
change: the bytes, the digests, a failure reported, and a discarded file removed even while a
flush is in flight.

os.fdatasync is wrapped here only to count calls, to hold one open, or to fail with EIO:
a device error cannot be produced on demand on this machine."""

import asyncio
import errno
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import blake3
import pytest

from versionstore import spool as spool_module
from versionstore.spool import SpoolFile

MiB = 1 << 20


def blocks(count: int) -> list[bytes]:
    return [os.urandom(MiB) for _ in range(count)]


@pytest.fixture
def flush_every_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SYNC_EVERY", MiB)


def wrap_fdatasync(monkeypatch: pytest.MonkeyPatch, wrapper: Callable[[int], None]) -> None:
    monkeypatch.setattr(os, "fdatasync", wrapper)


async def test_flushes_while_writing_and_keeps_the_bytes(tmp_path: Path, flush_every_mib: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = os.fdatasync, []

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    wrap_fdatasync(monkeypatch, counting)
    data = blocks(12)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    for block in data:
        await spool.write_block(memoryview(bytearray(block)))
    spooled = await spool.finish()
    whole = b"".join(data)
    assert spooled.path.read_bytes() == whole
    assert spooled.digest == blake3.blake3(whole).hexdigest()
    assert spooled.md5 == hashlib.md5(whole).hexdigest()
    assert calls  # at most one in flight, none waited for by the writes


async def test_small_files_are_not_flushed_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    wrap_fdatasync(monkeypatch, calls.append)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    await spool.write(b"x" * 1000)
    await spool.finish()
    assert calls == []


async def test_a_failed_background_flush_fails_the_upload(tmp_path: Path, flush_every_mib: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a writeback error to one fsync per open file only: the final fsync would
    not see it again, so the spool must raise the background flush's own error."""

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    wrap_fdatasync(monkeypatch, failing)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    for block in blocks(4):
        await spool.write_block(memoryview(bytearray(block)))
    with pytest.raises(OSError) as raised:
        await spool.finish(sync=False)  # even when the fsync is left to the consumer
    assert raised.value.errno == errno.EIO
    spool.discard()
    assert list(tmp_path.iterdir()) == []


async def test_discard_during_a_flush_removes_the_file_when_it_ends(tmp_path: Path, flush_every_mib: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real, started, release = os.fdatasync, threading.Event(), threading.Event()

    def held(fd: int) -> None:
        started.set()
        release.wait(10)
        real(fd)

    wrap_fdatasync(monkeypatch, held)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    for block in blocks(2):
        await spool.write_block(memoryview(bytearray(block)))
    await until(started.is_set)
    spool.discard()
    assert spool.path.exists()  # the flush still uses it: never closed under a worker
    release.set()
    await until(lambda: not spool.path.exists())
    assert list(tmp_path.iterdir()) == []


async def until(condition: Callable[[], bool]) -> None:
    """Poll without blocking the loop (the workers' jobs start from it)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_flushed_pages_are_dropped_in_order_and_only_once_written(tmp_path: Path, flush_every_mib: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """After each background flush the flushed range is dropped from the page cache: ranges that
    follow each other from 0, never past what was written when the flush started."""
    real_sync, real_advise = os.fdatasync, os.posix_fadvise
    written_at_sync: list[int] = []
    drops: list[tuple[int, int, int]] = []
    spool = SpoolFile(tmp_path, limit=64 * MiB)

    def syncing(fd: int) -> None:
        written_at_sync.append(os.fstat(fd).st_size)
        real_sync(fd)

    def advising(fd: int, offset: int, length: int, advice: int) -> None:
        drops.append((offset, length, advice))
        real_advise(fd, offset, length, advice)

    wrap_fdatasync(monkeypatch, syncing)
    monkeypatch.setattr(os, "posix_fadvise", advising)
    data = blocks(12)
    for block in data:
        await spool.write_block(memoryview(bytearray(block)))
    spooled = await spool.finish()
    assert spooled.path.read_bytes() == b"".join(data)
    assert drops and all(advice == os.POSIX_FADV_DONTNEED for _, _, advice in drops)
    end = 0
    for offset, length, _ in drops:
        assert offset == end and length > 0
        end = offset + length
    assert end <= max(written_at_sync)


async def test_a_failed_page_drop_does_not_fail_the_upload(tmp_path: Path, flush_every_mib: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refusing)
    data = blocks(6)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    for block in data:
        await spool.write_block(memoryview(bytearray(block)))
    spooled = await spool.finish()
    assert spooled.path.read_bytes() == b"".join(data)
    assert spooled.md5 == hashlib.md5(b"".join(data)).hexdigest()
