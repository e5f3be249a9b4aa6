"""The SQLite cache epoch read from the WAL-index header (gateway.WalIndexEpoch).

What the read path caches until anything commits (epoch_cache.py) is only as exact as the
epoch: it must move at every commit of every connection and process, also around checkpoints
that rewind or truncate the log. Checked here against SQLite itself on real files, with
commits and checkpoints from this process and from another one."""

import asyncio
import os
import random
import sqlite3
import sys
from pathlib import Path

from versionstore import gateway as gateway_module
from versionstore.gateway import SqliteGateway, WalIndexEpoch

#: Run by another process: one commit, one rolled-back write, or a checkpoint of each mode.
_OTHER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA busy_timeout = 10000")
for op in sys.argv[2:]:
    if op == "commit":
        db.execute("INSERT INTO t (v) VALUES ('other process')")
    elif op == "rollback":
        db.execute("BEGIN IMMEDIATE"); db.execute("INSERT INTO t (v) VALUES ('never')"); db.execute("ROLLBACK")
    else:
        db.execute(f"PRAGMA wal_checkpoint({op})").fetchone()
db.close()
"""

_LOCAL = ("commit", "rollback", "read", "PASSIVE", "FULL", "RESTART", "TRUNCATE")


async def _gateway(tmp_path: Path) -> SqliteGateway:
    path = tmp_path / "m.sqlite3"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("CREATE TABLE t (pk INTEGER PRIMARY KEY, v TEXT)")
    setup.close()
    return await SqliteGateway.open(path)


def _local(db: sqlite3.Connection, op: str) -> None:
    if op == "commit":
        db.execute("INSERT INTO t (v) VALUES ('this process')")
    elif op == "rollback":
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (v) VALUES ('never')")
        db.execute("ROLLBACK")
    elif op == "read":
        db.execute("SELECT count(*) FROM t").fetchone()
    else:
        db.execute(f"PRAGMA wal_checkpoint({op})").fetchone()


async def test_the_epoch_moves_at_every_commit_of_every_connection_and_process_around_checkpoints(tmp_path: Path) -> None:
    gateway = await _gateway(tmp_path)
    path = str(tmp_path / "m.sqlite3")
    other = sqlite3.connect(path, isolation_level=None)
    rng = random.Random(1127)
    try:
        assert isinstance(gateway.cache_epoch(), bytes), "the header is read, not the pragma"

        async def content() -> list[object]:
            return list(await gateway.all("SELECT pk, v FROM t ORDER BY pk"))

        async def gateway_commit() -> None:
            async with gateway.transaction() as db:
                await db.execute("INSERT INTO t (v) VALUES ('our writer')")

        seen, rows = gateway.cache_epoch(), await content()
        steps = [rng.choice(_LOCAL) for _ in range(60)]
        # another process: a commit right after each checkpoint mode, and alone
        steps[10:10] = [("other", "TRUNCATE", "commit"), ("other", "RESTART", "commit"), ("other", "commit")]
        steps[30:30] = [("other", "rollback"), ("other", "PASSIVE"), ("writer",), ("other", "FULL", "commit")]
        for step in steps:
            if isinstance(step, str):
                _local(other, step)
            elif step[0] == "writer":
                await gateway_commit()
            else:
                other_process = await asyncio.create_subprocess_exec(sys.executable, "-c", _OTHER, path, *step[1:])
                assert await asyncio.wait_for(other_process.wait(), 60) == 0
            epoch, now = gateway.cache_epoch(), await content()
            if now != rows:
                assert epoch != seen, f"the data changed ({step}) but the epoch did not"
            if step == "read":
                assert epoch == seen, "a read moved the epoch: nothing could be cached"
            seen, rows = epoch, now
        assert len(rows) > 10
    finally:
        other.close()
        await gateway.close()


def test_a_header_that_is_being_written_or_not_initialised_is_not_an_epoch(tmp_path: Path) -> None:
    """The two copies differ while a writer is between them; isInit is 0 before recovery; an
    unknown version is a layout this code does not know. Each is None: the caller asks SQLite."""
    version = (3007000).to_bytes(4, sys.byteorder)
    good = version + bytes(8) + b"\x01" + bytes(35)
    cases = {
        "good": good + good,
        "torn": good + good[:20] + b"\x09" + good[21:],
        "uninitialised": (version + bytes(44)) * 2,
        "unknown version": ((3007001).to_bytes(4, sys.byteorder) + good[4:]) * 2,
        "short": good,
    }
    read = {}
    for name, data in cases.items():
        shm = tmp_path / f"{name}.sqlite3-shm"
        shm.write_bytes(data)
        epoch = WalIndexEpoch.open(tmp_path / f"{name}.sqlite3")
        assert epoch is not None
        read[name] = epoch.read()
        epoch.close()
    assert read == {"good": good, "torn": None, "uninitialised": None, "unknown version": None, "short": None}
    assert WalIndexEpoch.open(tmp_path / "missing.sqlite3") is None


async def test_without_a_readable_header_the_epoch_is_sqlites_data_version(tmp_path: Path) -> None:
    gateway = await _gateway(tmp_path)
    wal_index = None
    try:
        wal_index, gateway._wal_index = gateway._wal_index, None  # as when the -shm file cannot be opened
        before = gateway.cache_epoch()
        assert isinstance(before, int)
        other = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
        other.execute("INSERT INTO t (v) VALUES ('x')")
        other.close()
        assert gateway.cache_epoch() != before
    finally:
        await gateway.close()
        if wal_index is not None:
            wal_index.close()  # after the connections: closing it drops this process's locks on the file


async def test_gateways_of_one_process_share_the_file_and_the_last_one_closes_it(tmp_path: Path) -> None:
    """POSIX locks belong to the process and go with the first descriptor of the file it closes:
    so one descriptor per process, closed after the last gateway's connections."""
    first = await _gateway(tmp_path)
    second = await SqliteGateway.open(tmp_path / "m.sqlite3")
    shm = os.stat(tmp_path / "m.sqlite3-shm")
    try:
        assert first._wal_index is not None and first._wal_index is second._wal_index
        await first.close()
        before = second.cache_epoch()
        async with second.transaction() as db:
            await db.execute("INSERT INTO t (v) VALUES ('after the first closed')")
        after = second.cache_epoch()
        assert isinstance(after, bytes) and after != before
    finally:
        await second.close()
    assert (shm.st_dev, shm.st_ino) not in gateway_module._WAL_INDEXES
