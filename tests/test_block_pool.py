"""The tap's blocks are reused across uploads (versionstore/block_pool.py), within a bound, and
a block goes back to the pool only once no spool worker can read it any more
(`SpoolFile.when_workers_done`), even when the upload's waiter was cancelled while a worker
still held its block."""

import asyncio
import contextlib
import mmap
import os
import threading
from pathlib import Path

from tests.test_spool_flush import until
from tests.test_spool_lanes import held_blake3
from versionstore.block_pool import BlockPool
from versionstore.spool import SpoolFile

PAGE = mmap.PAGESIZE


def test_a_given_block_is_taken_again_and_new_ones_only_when_none_is_free() -> None:
    pool = BlockPool(limit=1 << 20)
    first = pool.take(1000)
    assert pool.allocated == 1 and len(first) == 1000
    pool.give([first])
    assert pool.pooled_bytes == PAGE and pool.free_blocks == 1  # a block holds whole pages
    assert pool.take(1000) is first and pool.pooled_bytes == 0
    other = pool.take(500)  # another size is another block
    assert other is not first and pool.allocated == 2


def test_the_pool_keeps_at_most_its_limit() -> None:
    pool = BlockPool(limit=3 * PAGE)
    blocks = [pool.take(PAGE) for _ in range(5)]
    pool.give(blocks)
    assert pool.pooled_bytes == 3 * PAGE and pool.free_blocks == 3
    taken = [pool.take(PAGE) for _ in range(5)]
    assert pool.allocated == 7  # three came back, two were freed and made again
    assert len({id(block) for block in taken}) == 5


async def test_workers_done_waits_for_a_held_worker_even_after_its_waiter_was_cancelled(tmp_path: Path) -> None:
    """The hazard of reusing a lent block: the upload fails while the write lane still reads its
    first block, and the task that waited for that block was cancelled (which cancels the
    block's future too). The callback must come only after the worker let go."""
    spool = SpoolFile(tmp_path, limit=64 << 20)
    started, release = threading.Event(), threading.Event()
    held_blake3(spool, started, release)
    await spool.write_block(memoryview(bytearray(os.urandom(4096))))
    await until(started.is_set)
    waiting = asyncio.ensure_future(spool.finish())  # waits for the held block
    await asyncio.sleep(0.05)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    spool.discard()
    done = asyncio.Event()
    spool.when_workers_done(done.set)
    await asyncio.sleep(0.2)
    assert not done.is_set()  # the worker still reads the first block
    release.set()
    await asyncio.wait_for(done.wait(), 10)


async def test_workers_done_comes_at_once_for_a_spool_without_blocks(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path, limit=1 << 20, md5=False)
    done = asyncio.Event()
    spool.when_workers_done(done.set)
    await asyncio.wait_for(done.wait(), 10)
    spool.discard()
