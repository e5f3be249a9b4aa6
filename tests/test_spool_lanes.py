"""The spool's deep pipeline (versionstore/spool_lanes.py): two independent lanes, each taking
its blocks in order, up to `IN_FLIGHT` blocks in flight; what it must keep: the bytes and both
digests, the memory bound, a lane's failure stopping that lane and failing the upload with
nothing left behind, and no thread job left running after a discard.

A lane is held or failed by replacing the spool's BLAKE3 update (the first thing the write lane
does with a block) with one that waits for an event or raises: a full disk cannot be produced
on demand here, and the write lane's failure path is the same for either."""

import asyncio
import errno
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import pytest

from tests.test_spool_flush import until
from versionstore import spool as spool_module
from versionstore import spool_lanes
from versionstore.spool import IN_FLIGHT, SpoolFile
from versionstore.spool_lanes import SLICES, TIMELINE_ENV, Lane

MiB = 1 << 20


def held_blake3(spool: SpoolFile, started: threading.Event, release: threading.Event) -> None:
    """The write lane stops at its first block until `release` is set."""
    real = spool.hashes.update_blake3

    def held(data: bytes | memoryview) -> None:
        started.set()
        release.wait(10)
        real(data)

    spool.hashes.update_blake3 = held  # type: ignore[method-assign]


def count_md5(spool: SpoolFile) -> list[int]:
    calls: list[int] = []
    real = spool.hashes.update_md5_all

    def counting(chunks: list[bytes | memoryview]) -> None:
        real(chunks)
        calls.append(len(chunks))

    spool.hashes.update_md5_all = counting  # type: ignore[method-assign]
    return calls


async def test_the_md5_lane_runs_ahead_of_a_stalled_write_lane_within_the_memory_bound(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    started, release = threading.Event(), threading.Event()
    held_blake3(spool, started, release)
    md5_blocks = count_md5(spool)
    data = [os.urandom(MiB) for _ in range(IN_FLIGHT + 2)]
    for block in data[:IN_FLIGHT]:  # all handed over at once: the write lane holds only the first
        await spool.write_block(memoryview(bytearray(block)))
    await until(started.is_set)
    await until(lambda: len(md5_blocks) == IN_FLIGHT)  # MD5 went on through every block in flight
    blocked = asyncio.ensure_future(spool.write_block(memoryview(bytearray(data[IN_FLIGHT]))))
    await asyncio.sleep(0.2)
    assert not blocked.done()  # one block more would exceed the bound: the caller waits
    release.set()
    await blocked
    await spool.write_block(memoryview(bytearray(data[-1])))
    spooled = await spool.finish()
    whole = b"".join(data)
    assert spooled.path.read_bytes() == whole
    assert spooled.digest == blake3.blake3(whole).hexdigest()
    assert spooled.md5 == hashlib.md5(whole).hexdigest()


async def test_a_write_lane_failure_mid_pipeline_fails_the_upload_and_leaves_nothing(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path, limit=256 * MiB)
    real, calls = spool.hashes.update_blake3, []

    def failing_third(data: bytes | memoryview) -> None:
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(data)

    spool.hashes.update_blake3 = failing_third  # type: ignore[method-assign]
    with pytest.raises(OSError) as raised:
        for _ in range(4 * IN_FLIGHT):
            await spool.write_block(memoryview(bytearray(os.urandom(MiB))))
        await spool.finish()
    assert raised.value.errno == errno.ENOSPC
    spool.discard()
    await until(lambda: not spool._write_lane._running)
    assert spool._md5_lane is not None
    await until(lambda: not spool._md5_lane._running)
    assert len(calls) == 3  # no block after the failed one was written: the file's bytes stay in order
    assert list(tmp_path.iterdir()) == []


async def test_a_discard_with_blocks_in_flight_ends_every_lane_job(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path, limit=64 * MiB)
    started, release = threading.Event(), threading.Event()
    held_blake3(spool, started, release)
    for _ in range(IN_FLIGHT):
        await spool.write_block(memoryview(bytearray(os.urandom(MiB))))
    await until(started.is_set)
    spool.discard()
    assert spool.path.exists()  # the write lane still uses it: never closed under a worker
    release.set()
    await until(lambda: not spool._write_lane._running and not spool.path.exists())
    assert spool._md5_lane is not None
    await until(lambda: not spool._md5_lane._running)
    assert list(tmp_path.iterdir()) == []


async def test_a_lane_runs_its_jobs_in_order_and_stops_at_the_first_failure() -> None:
    lane, ran = Lane("test", None), []

    def job(chunks: list[bytes | memoryview]) -> None:
        ran.append(bytes(chunks[0]))
        if chunks[0] == b"2":
            raise ValueError("bad block")

    futures = [lane.submit(job, [str(i).encode()]) for i in range(5)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert ran == [b"0", b"1", b"2"]
    assert results[:2] == [None, None]
    assert all(isinstance(result, ValueError) for result in results[2:])
    # The drain job settles the last future, then finds the lane empty and stops: a moment later.
    await until(lambda: not lane._running)


async def test_the_timeline_records_each_lane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(record))
    monkeypatch.setattr(spool_module, "SYNC_EVERY", MiB)
    spools = tmp_path / "spool"
    spools.mkdir()
    spool = SpoolFile(spools, limit=64 * MiB)
    for _ in range(6):
        await spool.write_block(memoryview(bytearray(os.urandom(MiB))))
    await spool.finish()
    (line,) = record.read_text().splitlines()
    summary = json.loads(line)
    assert summary["bytes"] == 6 * MiB
    assert summary["lanes"]["write"]["jobs"] == summary["lanes"]["md5"]["jobs"] == 6
    assert {"sync", "close"} <= set(summary["lanes"])
    assert 0 < summary["lanes"]["md5"]["busy_of_life"] <= 1
    slices = summary["lanes"]["md5"]["slices"]
    assert len(slices) == SLICES and all(0 <= share <= 1.01 for share in slices) and any(slices)


async def test_lanes_share_their_threads_a_run_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lane gives its thread up after RUN jobs in a row: with one thread for all lanes, a second
    lane's jobs run before the first lane's long queue is done, not after it."""
    monkeypatch.setattr(spool_lanes, "RUN", 2)
    one = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(spool_lanes, "_THREADS", one)
    order: list[str] = []

    def job(chunks: list[bytes | memoryview]) -> None:
        order.append(bytes(chunks[0]).decode())

    first, second = Lane("a", None), Lane("b", None)
    futures = [first.submit(job, [f"a{i}".encode()]) for i in range(6)]
    futures += [second.submit(job, [f"b{i}".encode()]) for i in range(2)]
    await asyncio.gather(*futures)
    one.shutdown()
    assert order.index("b1") < order.index("a5")
    assert [name for name in order if name[0] == "a"] == [f"a{i}" for i in range(6)]
    assert not first._running and not second._running
