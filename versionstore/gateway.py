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
- `point_transaction()`: a write transaction of a few indexed statements (an upload's journal
  rows, its version commit): COMMIT (which waits for fsync) runs on a thread of its own, the
  statements before it on the event loop, like the point reads. BEGIN IMMEDIATE is tried on
  the loop without waiting (the point connection's busy timeout is 0: taking a free write
  lock is a few microseconds of shared-memory and lock calls); only when another process's
  writer holds the lock (or the commit thread still has a cancelled transaction's COMMIT or
  ROLLBACK queued) does it run on the commit thread, waiting as the busy timeout would.
  One thread hop per transaction instead of one per statement and fetch (docs/performance.md,
  "Overwrites", "Per-upload CPU"). PostgreSQL: `transaction()`.
"""

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    #: Migration numbers this open applied (empty when the schema was current).
    applied: list[int]

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

    def point_transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """`transaction()` for a few indexed statements (nothing whose cost grows with the library)."""

    async def lock(self, db: Transaction, key: str) -> None:
        """Inside a transaction: hold `key` until it ends (a read-then-decide unit of work)."""

    def commit_epoch(self) -> object | None:
        """A value that moves at every commit of every connection and process (see
        MetadataStore.commit_epoch), or None when it cannot tell (then nothing is cached)."""

    async def close(self) -> None: ...


async def _connect(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    await db.execute("PRAGMA busy_timeout = 10000")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute("PRAGMA synchronous = FULL")
    return db


async def _enter_wal(db: aiosqlite.Connection, *, within: float = 10.0) -> None:
    """`PRAGMA journal_mode = WAL`, retried while another process opening the same new file
    holds it: SQLite can answer "database is locked" at once there, without waiting out the
    busy timeout (seen with several processes starting on an empty data dir)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.02)


#: Seconds a BEGIN IMMEDIATE waits for another process's writer (the other connections' busy timeout).
BUSY_WAIT = 10.0
_BUSY_STEP = 0.002


def _point_connection(path: Path) -> sqlite3.Connection:
    """The connection of `point_transaction`: used by one thread at a time (under the write
    lock), the loop's or the commit thread's. Busy timeout 0: a BEGIN IMMEDIATE on the loop
    must never sleep in SQLite's busy handler (`_begin_waiting` waits on the commit thread).
    Holding the write lock, nothing else on it waits for a lock in WAL mode (the statements,
    COMMIT and its passive checkpoint)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    for pragma in ("busy_timeout = 0", "foreign_keys = ON", "synchronous = FULL"):
        conn.execute(f"PRAGMA {pragma}")
    return conn


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY (or one of its extended codes): another connection holds the lock."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _begin_waiting(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE retried while another writer holds the lock, up to BUSY_WAIT seconds
    (what the busy timeout does on the other connections); on the commit thread."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(_BUSY_STEP)


class _Done:
    """A statement run already: its row count and rows (the Cursor protocol)."""

    __slots__ = ("rowcount", "_rows")

    def __init__(self, rowcount: int, rows: list[Any]) -> None:
        self.rowcount = rowcount
        self._rows = rows

    async def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[Any]:
        return self._rows


class _InlineTransaction:
    """What `point_transaction` yields: each statement runs at once, in the calling thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> _Done:
        cursor = self._conn.execute(sql, args)
        rows = cursor.fetchall()
        return _Done(cursor.rowcount, rows)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> _Done:
        return _Done(self._conn.executemany(sql, rows).rowcount, [])


def _translated(exc: BaseException) -> BaseException:
    """sqlite3's IntegrityError as the gateway's (with the table of a unique violation)."""
    if isinstance(exc, sqlite3.IntegrityError) and not isinstance(exc, IntegrityError):
        match = _UNIQUE_TABLE.search(str(exc))
        return IntegrityError(str(exc), match.group(1) if match else None)
    return exc


class SqliteGateway:
    def __init__(
        self, writer: aiosqlite.Connection, scanner: aiosqlite.Connection, reader: sqlite3.Connection, applied: list[int],
        point: sqlite3.Connection | None = None,
    ) -> None:
        self._writer = writer
        self._scanner = scanner
        self._reader = reader
        self._write_lock = asyncio.Lock()
        self.applied = applied
        self._point = point
        # One thread: a BEGIN or COMMIT whose caller was cancelled still runs before the next
        # transaction's BEGIN on this connection, and none queues behind blob work.
        self._commit_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self._epoch: object | None = None  # commit_epoch() of this event-loop iteration
        self._queued: asyncio.Future[Any] | None = None  # the commit thread's last job

    @classmethod
    async def open(cls, path: Path) -> "SqliteGateway":
        """Open (creating the file if missing) and apply the migrations it lacks, each in one
        transaction; PRAGMA user_version records the last one applied."""
        writer = await _connect(path)
        applied = []
        try:
            await _enter_wal(writer)
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
        return cls(writer, scanner, reader, applied, _point_connection(path))

    async def close(self) -> None:
        self._reader.close()
        async with self._write_lock:
            self._commit_thread.shutdown(wait=True)
            if self._point is not None:
                self._point.close()
        await self._scanner.close()
        await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One serialised write transaction; rolled back on any exception."""
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException as exc:
                await self._writer.execute("ROLLBACK")
                if (translated := _translated(exc)) is not exc:
                    raise translated from exc
                raise
            await self._writer.execute("COMMIT")
            self._epoch = None

    @asynccontextmanager
    async def point_transaction(self) -> AsyncIterator[Transaction]:
        """`transaction()` with its statements inline and COMMIT on the commit thread; BEGIN
        inline too unless another process's writer holds the lock (then on the thread)."""
        if self._point is None:
            async with self.transaction() as db:
                yield db
            return
        point = self._point
        async with self._write_lock:
            try:
                await self._begin(point)
                yield _InlineTransaction(point)
                await self._on_commit_thread(point.execute, "COMMIT")
                self._epoch = None
            except BaseException as exc:
                # After the BEGIN or COMMIT still queued on the thread, if either was interrupted.
                await asyncio.shield(self._on_commit_thread(_roll_back, point))
                if (translated := _translated(exc)) is not exc:
                    raise translated from exc
                raise

    async def _begin(self, point: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE on the loop when the commit thread is idle and the write lock free;
        else on the commit thread, behind what is still queued there (a COMMIT or ROLLBACK whose
        caller was cancelled), waiting for another process's writer."""
        if self._queued is None or self._queued.done():
            try:
                point.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
        await self._on_commit_thread(_begin_waiting, point)

    def _on_commit_thread(self, call: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        """Run `call` on the commit thread; remembered until done, so no BEGIN runs inline meanwhile."""
        self._queued = asyncio.get_running_loop().run_in_executor(self._commit_thread, call, *args)
        return self._queued

    async def lock(self, db: Transaction, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serialises every writer."""

    def commit_epoch(self) -> object:
        """`PRAGMA data_version` changes whenever another connection (our writer, the CLI)
        commits, and costs less than the row look-up a cache saves.

        On the event loop it is read once per loop iteration (forgotten by a callback queued
        when it is read, which runs before anything the next select() delivers) and at once
        again after this gateway's own COMMIT. Every request that shares the value arrived
        before it was read, so a commit it does not show is one that request raced with; a
        request that follows a response it caused is read in a later iteration. The read's
        cost was a statement and four system calls per request (docs/performance.md)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a thread without a loop (the CLI, a worker): read it now
            return self._reader.execute("PRAGMA data_version").fetchone()[0]
        if self._epoch is None:
            self._epoch = self._reader.execute("PRAGMA data_version").fetchone()[0]
            loop.call_soon(self._forget_epoch)
        return self._epoch

    def _forget_epoch(self) -> None:
        self._epoch = None

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._reader.execute(sql, args).fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._reader.execute(sql, args).fetchall()

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(await self._scanner.execute_fetchall(sql, args))


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
