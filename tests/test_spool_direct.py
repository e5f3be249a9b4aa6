"""The spool writes whole pages of page-aligned blocks (the tap's `mmap` blocks) with O_DIRECT,
the rest through the page cache, and falls back to plain writes for good when the file system
refuses direct I/O: whichever way, the file holds the same bytes and digests.

os.pwrite and the O_DIRECT open are wrapped here only to see which descriptor wrote what, or to
refuse as a file system without direct I/O would (this machine's ext4 accepts it)."""

import errno
import hashlib
import mmap
import os
from pathlib import Path

import blake3
import pytest

from versionstore import spool as spool_module
from versionstore.spool import PAGE, SpoolFile

MiB = 1 << 20


def aligned_blocks(sizes: list[int]) -> tuple[list[mmap.mmap], bytes]:
    """Page-aligned blocks (anonymous mmaps, as the tap's) holding random bytes of `sizes`."""
    blocks, data = [], []
    for size in sizes:
        block = mmap.mmap(-1, max(size, 1))
        chunk = os.urandom(size)
        block[:size] = chunk
        blocks.append(block)
        data.append(chunk)
    return blocks, b"".join(data)


def record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Every os.pwrite as (fd, offset, length)."""
    real, calls = os.pwrite, []

    def recording(fd: int, data: memoryview, offset: int) -> int:
        calls.append((fd, offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    return calls


async def spool_blocks(directory: Path, sizes: list[int]) -> tuple[SpoolFile, bytes, set[int]]:
    """Spool page-aligned blocks of `sizes`; the O_DIRECT descriptors seen while they were written."""
    spool = SpoolFile(directory, limit=256 * MiB)
    blocks, data = aligned_blocks(sizes)
    direct: set[int] = set()
    for block, size in zip(blocks, sizes, strict=True):
        await spool.write_block(memoryview(block)[:size])
        if type(spool._direct) is int:
            direct.add(spool._direct)
    await spool._in_flight_done()
    if type(spool._direct) is int:
        direct.add(spool._direct)
    return spool, data, direct


async def check_spooled(spool: SpoolFile, data: bytes) -> None:
    spooled = await spool.finish()
    assert spooled.path.read_bytes() == data
    assert spooled.size == len(data)
    assert spooled.digest == blake3.blake3(data).hexdigest()
    assert spooled.md5 == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("last", [0, 1, PAGE - 1, PAGE, 3 * PAGE + 17])
async def test_whole_pages_of_aligned_blocks_go_past_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last: int) -> None:
    """Every 4 MiB block is one O_DIRECT write; the last block's whole pages too, its tail (under a
    page) a plain write at the offset after them."""
    writes = record_writes(monkeypatch)
    sizes = [4 * MiB, 4 * MiB, 2 * MiB + last] if last else [4 * MiB, 4 * MiB]
    spool, data, direct = await spool_blocks(tmp_path, sizes)
    assert len(direct) == 1
    (direct_fd,) = direct
    through_cache = [(offset, length) for fd, offset, length in writes if fd != direct_fd]
    assert [(offset, length) for fd, offset, length in writes if fd == direct_fd][:2] == [(0, 4 * MiB), (4 * MiB, 4 * MiB)]
    assert all(length % PAGE == 0 for fd, _, length in writes if fd == direct_fd)
    tail = (2 * MiB + last) % PAGE if last else 0
    assert through_cache == ([(len(data) - tail, tail)] if tail else [])
    await check_spooled(spool, data)
    assert spool._direct is None  # closed with the file


async def test_chunks_not_on_a_page_boundary_are_plain_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes (the small path, aiohttp's chunks) and a block after an unaligned length never use
    O_DIRECT: the file offset is no longer on a page boundary."""
    writes = record_writes(monkeypatch)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    first = os.urandom(MiB + 5)
    await spool.write(first)
    blocks, rest = aligned_blocks([2 * MiB, 2 * MiB])
    for block in blocks:
        await spool.write_block(memoryview(block)[: 2 * MiB])
    await spool._in_flight_done()
    assert spool._direct is None  # never opened
    assert sum(length for _, _, length in writes) == len(first) + len(rest)
    await check_spooled(spool, first + rest)


async def test_a_file_system_refusing_o_direct_gets_plain_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refusing(path: str, flags: int, *args: int) -> int:
        if flags & spool_module.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT not supported")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    spool, data, direct = await spool_blocks(tmp_path, [4 * MiB, 4 * MiB, MiB + 3])
    assert direct == set() and spool._direct is False
    await check_spooled(spool, data)


async def test_a_direct_write_refused_midway_goes_on_through_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EINVAL from a direct write (an alignment this file system wants larger): the block is
    written again plainly, the descriptor closed, and the rest of the file written plainly."""
    real, refused = os.pwrite, []

    def refusing_the_second(fd: int, data: memoryview, offset: int) -> int:
        if type(spool._direct) is int and fd == spool._direct and offset > 0:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_the_second)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    blocks, data = aligned_blocks([4 * MiB, 4 * MiB, 4 * MiB])
    for block in blocks:
        await spool.write_block(memoryview(block)[: 4 * MiB])
    await spool._in_flight_done()
    assert refused == [4 * MiB] and spool._direct is False
    await check_spooled(spool, data)


async def test_other_direct_write_errors_fail_the_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO or ENOSPC from a direct write is the upload's failure, not a reason to retry plainly."""
    real = os.pwrite

    def failing(fd: int, data: memoryview, offset: int) -> int:
        if type(spool._direct) is int and fd == spool._direct:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    blocks, _ = aligned_blocks([4 * MiB])
    with pytest.raises(OSError) as failed:
        await spool.write_block(memoryview(blocks[0]))
        await spool.finish()
    assert failed.value.errno == errno.ENOSPC
    spool.discard()
