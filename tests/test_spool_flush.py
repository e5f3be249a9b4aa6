"""The spool file flushes to the device while an upload arrives (SpoolFile's background
`fdatasync`), and what that must never change: the bytes, the digests, a failure reported,
and a discarded file removed even while a flush is in flight.

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
