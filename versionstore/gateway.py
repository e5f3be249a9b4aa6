"""The SQL gateway under MetadataStore: where a statement runs, not what it says.

MetadataStore keeps one body of (portable) SQL and sends every statement through four entry
points: `one`/`all` (point reads), `scan` (reads whose cost grows with the library) and
`transaction()`, which yields a cursor-like object (`execute` -> rowcount, fetchone, fetchall;
`executemany`). SQLite's gateway is here; PostgreSQL's is versionstore/pg.py.

SQLite (the embedded default):
- Writes go through aiosqlite's thread: with synchronous=FULL (an acknowledged upload must
  survive a power cut) a commit waits for fsync, which must not stall the event loop.
- Point reads run on a plain sqlite3 connection in the event-loop thread: they are indexed
  look-ups of tens of microseconds, and a hop to a worker thread and back cost several times
  more than the query under load (measured in docs/performance.md). WAL readers never wait.
- Scans keep a worker-thread connection.
- One writer at a time (BEGIN IMMEDIATE), in this process and across processes.
- The cache epoch (`cache_epoch`, what the read path's caches key on) is the WAL-index header
  read from the `-shm` file, the value SQLite itself compares to see another connection's
  commit (`WalIndexEpoch`); `PRAGMA data_version` when that header cannot be read.
"""

import asyncio
import mmap
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import aiosqlite

from versionstore.dialect import statements


def migrations() -> list[str]:
    """The numbered blocks of schema.sql, in order (block N is migration N)."""
    text = resources.files("versionstore").joinpath("schema.sql").read_text()
    return [block for block in re.split(r"^-- migration \d+\s*$", text, flags=re.M)[1:]]


class IntegrityError(sqlite3.IntegrityError):
    """A constraint refused a write, on either backend. A subclass of sqlite3's, so code that
    catches sqlite3.IntegrityError keeps working; `table` names the table of a unique
    violation (None for other constraints)."""

    def __init__(self, message: str, table: str | None) -> None:
        super().__init__(message)
        self.table = table


_UNIQUE_TABLE = re.compile(r"UNIQUE constraint failed: (\w+)\.")


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    async def fetchone(self) -> Any: ...

    async def fetchall(self) -> Iterable[Any]: ...


class Transaction(Protocol):
    """What `transaction()` yields: an aiosqlite connection, or versionstore.pg.PgTransaction."""

    @property
    def execute(self) -> Callable[..., Awaitable[Cursor]]: ...

    @property
    def executemany(self) -> Callable[..., Awaitable[Any]]: ...


class Gateway(Protocol):
    #: Whether `cache_epoch()` moves at every commit of every connection and process: then a
    #: cached row, or a cached "no such row", may be trusted until it moves.
    caches_misses: bool
    #: Migration numbers this open applied (empty when the schema was current).
    applied: list[int]

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    async def lock(self, db: Transaction, key: str) -> None:
        """Inside a transaction: hold `key` until it ends (a read-then-decide unit of work)."""

    def cache_epoch(self) -> object:
        """Moves on whenever cached rows may be stale (see MetadataStore.get_cloud)."""

    async def close(self) -> None: ...


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA busy_timeout = 10000")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute("PRAGMA synchronous = FULL")
    return db


#: sqlite's wal.c: the shared-memory index starts with two copies of its 48-byte header
#: (WalIndexHdr: iVersion, unused, iChange, isInit, bigEndCksum, szPage, mxFrame, nPage,
#: aFrameCksum[2], aSalt[2], aCksum[2]), in the machine's byte order.
_HEADER = 48
_INDEX_VERSION = (3007000).to_bytes(4, sys.byteorder)


class WalIndexEpoch:
    """The WAL-index header of a database in WAL mode, read from its `-shm` file: what moves
    at every commit of every connection of every process, for a 96-byte memory read instead of
    a statement (docs/performance.md, "The read path, fourth round").

    Why it is exact. A writer commits by appending frames to the -wal file and then writing this
    header (its `iChange` counts commits, `mxFrame` is the last committed frame; a checkpoint
    that restarts the log writes new salts), copy 1 first, then copy 0, before it releases its
    lock: so once a commit has returned, the header differs from every header before it. Frames
    of a transaction that has not committed (or rolled back) are not in the header. A reader
    starting a transaction, and `PRAGMA data_version`, learn of other connections' commits in
    exactly this way: by comparing this header with the one they saw last (wal.c,
    walIndexReadHdr). The file is mapped, as SQLite maps it, so the read sees SQLite's writes.

    Why it is safe. While this process has the database open, its connections hold the shared
    lock that keeps any other process from re-initialising (truncating) the file. Those are
    POSIX locks, which a process loses when it closes *any* descriptor of the file: so this
    process opens the file once, however many gateways it has on the database, and the
    descriptor and the mapping (which holds a copy of it) stay open until the last of them has
    closed its connections (SqliteGateway.close), even when the header cannot be mapped.

    `read()` is None, and the caller asks SQLite instead, when the two copies differ (a writer
    is between them), when the header is not initialised (recovery pending) or not of the
    version described here."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._users = 1
        self._mapped: mmap.mmap | None = None
        try:
            if os.fstat(fd).st_size >= 2 * _HEADER:
                self._mapped = mmap.mmap(fd, 2 * _HEADER, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError:
            pass  # read() is then always None

    @classmethod
    def open(cls, database: Path) -> "WalIndexEpoch | None":
        """The header of `database`, shared by every gateway of this process on that file (a
        second descriptor could only be closed at the cost of the first one's locks)."""
        shm = f"{database}-shm"
        try:
            stat = os.stat(shm)
            known = _WAL_INDEXES.get((stat.st_dev, stat.st_ino))
            if known is not None:
                known._users += 1
                return known
            fd = os.open(shm, os.O_RDONLY)
        except OSError:
            return None
        stat = os.fstat(fd)
        opened = _WAL_INDEXES[(stat.st_dev, stat.st_ino)] = cls(fd)
        return opened

    def read(self) -> bytes | None:
        if self._mapped is None:
            return None
        both = self._mapped[: 2 * _HEADER]
        header = both[:_HEADER]
        if header != both[_HEADER:] or header[12] != 1 or header[:4] != _INDEX_VERSION:
            return None
        return header

    def close(self) -> None:
        """Called by each gateway once its connections are closed; the last one closes the file
        (class doc)."""
        self._users -= 1
        if self._users > 0:
            return
        for key in [key for key, known in _WAL_INDEXES.items() if known is self]:
            del _WAL_INDEXES[key]
        if self._mapped is not None:
            self._mapped.close()
        os.close(self._fd)


#: (device, inode) of a -shm file -> its one WalIndexEpoch in this process.
_WAL_INDEXES: dict[tuple[int, int], WalIndexEpoch] = {}


class SqliteGateway:
    caches_misses = True

    def __init__(
        self, writer: aiosqlite.Connection, scanner: aiosqlite.Connection, reader: sqlite3.Connection, applied: list[int],
        wal_index: WalIndexEpoch | None = None,
    ) -> None:
        self._writer = writer
        self._scanner = scanner
        self._reader = reader
        self._wal_index = wal_index
        self._write_lock = asyncio.Lock()
        self.applied = applied

    @classmethod
    async def open(cls, path: Path) -> "SqliteGateway":
        """Open (creating the file if missing) and apply the migrations it lacks, each in one
        transaction; PRAGMA user_version records the last one applied."""
        writer = await _connect(path)
        applied = []
        try:
            await writer.execute("PRAGMA journal_mode = WAL")
            (seen,) = await (await writer.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
            for number, block in enumerate(migrations(), start=1):
                if number <= seen:
                    continue
                # Read the version inside the write transaction: processes that start at once
                # then apply each block exactly once, one after the other.
                await writer.execute("BEGIN IMMEDIATE")
                (current,) = await (await writer.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
                if number > current:
                    for statement in statements(block):
                        await writer.execute(statement)
                    await writer.execute(f"PRAGMA user_version = {number}")
                    applied.append(number)
                await writer.execute("COMMIT")
        except BaseException:
            # A failed migration leaves its transaction open; roll it back and close the
            # connection, whose thread would otherwise keep the process alive.
            if writer.in_transaction:
                await writer.rollback()
            await writer.close()
            raise
        scanner = await _connect(path)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("PRAGMA busy_timeout = 10000")
        reader.execute("PRAGMA data_version").fetchone()  # the -shm file exists once a connection has read
        return cls(writer, scanner, reader, applied, WalIndexEpoch.open(path))

    async def close(self) -> None:
        self._reader.close()
        await self._scanner.close()
        await self._writer.close()
        if self._wal_index is not None:  # last: closing it drops this process's locks on the file (WalIndexEpoch)
            self._wal_index.close()
            self._wal_index = None

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One serialised write transaction; rolled back on any exception."""
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException as exc:
                await self._writer.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError) and not isinstance(exc, IntegrityError):
                    match = _UNIQUE_TABLE.search(str(exc))
                    raise IntegrityError(str(exc), match.group(1) if match else None) from exc
                raise
            await self._writer.execute("COMMIT")

    async def lock(self, db: Transaction, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serialises every writer."""

    def cache_epoch(self) -> object:
        """Moves at every commit of any connection (our writer, another process, the CLI): the
        WAL-index header (WalIndexEpoch, one `pread`), else `PRAGMA data_version` (a statement,
        several times the cost). The two kinds of value never compare equal, so switching
        between them only drops what was cached."""
        if self._wal_index is not None and (header := self._wal_index.read()) is not None:
            return header
        return self._reader.execute("PRAGMA data_version").fetchone()[0]

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._reader.execute(sql, args).fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._reader.execute(sql, args).fetchall()

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(await self._scanner.execute_fetchall(sql, args))
