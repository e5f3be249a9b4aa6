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
  rows, its version commit), its statements inline on the event loop like the point reads.
  Group commit: one that ends while others queue for the lock leaves the SQLite transaction
  open for them (each body in a savepoint), and the last of the batch sends the one COMMIT
  (which waits for fsync) to a thread of its own; every body returns after that COMMIT, so an
  acknowledged write is durable and concurrent uploads share a fsync. BEGIN IMMEDIATE runs
  inline unless another process holds the write lock (then on that thread, which waits).
  docs/design.md, "Metadata schema". PostgreSQL: `transaction()`.
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

#: How long a connection waits for another's write lock (another process's writer) before "locked".
BUSY_TIMEOUT_MS = 10_000
#: Point transactions committed together at most (group commit, module doc): bounds how long the
#: first body of a batch waits for its COMMIT, and how long another process waits for the lock.
GROUP_COMMIT_MAX = 32


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
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
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


def _point_connection(path: Path) -> sqlite3.Connection:
    """The connection of `point_transaction`: used by one thread at a time (under the write
    lock), the loop's or the commit thread's. Busy timeout 0: a BEGIN IMMEDIATE on the loop
    must never sleep in SQLite's busy handler (`_begin_waiting` waits on the commit thread).
    Holding the write lock, nothing else on it waits for a lock in WAL mode (the statements,
    COMMIT and its passive checkpoint). Temp storage in memory: a statement in a savepoint
    needs a statement journal, which SQLite otherwise creates (and unlinks) as a file in
    /var/tmp, on the event loop, once per upload; its few indexed rows fit in memory."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    for pragma in ("busy_timeout = 0", "foreign_keys = ON", "synchronous = FULL", "temp_store = MEMORY"):
        conn.execute(f"PRAGMA {pragma}")
    return conn


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
        # Group commit of point transactions (module doc).
        self._batch_open = False  # a BEGIN IMMEDIATE of the point connection not yet ended
        self._batch: list[asyncio.Future[None]] = []  # its bodies, waiting for its COMMIT
        self._point_waiters = 0  # point transactions waiting for the write lock
        self._flusher: asyncio.Future[None] | None = None
        self._thread_job: asyncio.Future[Any] | None = None  # the commit thread's last job

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
        reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return cls(writer, scanner, reader, applied, _point_connection(path))

    async def close(self) -> None:
        self._reader.close()
        async with self._write_lock:
            if self._point is not None:
                await self._commit_batch(self._point)
            self._commit_thread.shutdown(wait=True)
            if self._point is not None:
                self._point.close()
        await self._scanner.close()
        await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One serialised write transaction; rolled back on any exception."""
        async with self._write_lock:
            if self._point is not None:  # an open batch of the point connection holds SQLite's write lock
                await self._commit_batch(self._point)
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
        """`transaction()` of a few indexed statements, group-committed (module doc): the body
        runs inline in a savepoint of the open batch and returns once a COMMIT that covers it
        has been fsynced. A body that fails is rolled back to its savepoint; the batch goes on."""
        if self._point is None:
            async with self.transaction() as db:
                yield db
            return
        point = self._point
        self._point_waiters += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._point_waiters -= 1
            self._flush_if_abandoned()
        committed: asyncio.Future[None] | None = None
        try:
            await self._begin_batch(point)
            point.execute("SAVEPOINT point")
            try:
                yield _InlineTransaction(point)
            except BaseException as exc:
                self._undo_body(point)
                if (translated := _translated(exc)) is not exc:
                    raise translated from exc
                raise
            point.execute("RELEASE point")
            committed = asyncio.get_running_loop().create_future()
            committed.add_done_callback(_retrieved)
            self._batch.append(committed)
        finally:
            try:
                if not (self._point_waiters and len(self._batch) < GROUP_COMMIT_MAX):
                    await self._commit_batch(point)
                # else the next point transaction runs in this batch; it or a later one commits it
            finally:
                self._write_lock.release()
        await committed

    async def _begin_batch(self, point: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE unless a batch is open: inline when SQLite's write lock is free (the
        usual case with one process), else on the commit thread, which waits for another
        process's writer up to the busy timeout."""
        if self._batch_open:
            return
        await self._quiesce()
        try:
            point.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            try:
                await asyncio.shield(self._on_commit_thread(_begin_waiting, point))
            except asyncio.CancelledError:  # the BEGIN still runs: end it after
                self._on_commit_thread(_roll_back, point)
                raise
        self._batch_open = True

    def _undo_body(self, point: sqlite3.Connection) -> None:
        """After a body failed: its writes are rolled back, the batch's kept. An error after
        which SQLite rolled the whole transaction back (a full disk, an I/O error) fails the batch."""
        if point.in_transaction:
            point.execute("ROLLBACK TO point")
            point.execute("RELEASE point")
        elif self._batch_open:
            self._batch_open = False
            _settle(self._take_batch(), sqlite3.OperationalError("the transaction of this write was rolled back"))

    async def _commit_batch(self, point: sqlite3.Connection) -> None:
        """End the open batch: COMMIT on the commit thread (it waits for fsync), then settle every
        body in it. The commit runs in a task of its own, so a committer cancelled meanwhile does
        not leave the other bodies waiting; an empty batch is rolled back (no fsync)."""
        if not self._batch_open:
            return
        self._batch_open = False
        batch = self._take_batch()
        if not batch:
            point.execute("ROLLBACK")
            return
        # Queued before any await, so the next BEGIN (after _quiesce) follows it on the connection.
        job = self._on_commit_thread(_commit_or_roll_back, point)
        await asyncio.shield(asyncio.ensure_future(self._settle_when_done(job, batch)))

    async def _settle_when_done(self, job: "asyncio.Future[None]", batch: list["asyncio.Future[None]"]) -> None:
        try:
            await job
        except BaseException as exc:
            _settle(batch, exc)
            raise
        self._epoch = None
        _settle(batch, None)

    def _take_batch(self) -> list["asyncio.Future[None]"]:
        batch, self._batch = self._batch, []
        return batch

    async def _quiesce(self) -> None:
        """Wait until the commit thread is done with the point connection (a COMMIT or ROLLBACK
        whose caller was cancelled) before the loop's thread uses it again."""
        job = self._thread_job
        if job is not None and not job.done():
            await asyncio.wait([job])

    def _flush_if_abandoned(self) -> None:
        """A batch left open for a waiter that was then cancelled: commit it from a task of its
        own, so no body waits for a COMMIT nobody would run."""
        if self._batch_open and not self._point_waiters and not self._write_lock.locked() and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            async with self._write_lock:
                if self._point is not None:
                    await self._commit_batch(self._point)
        finally:
            self._flusher = None

    def _on_commit_thread(self, call: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        job = asyncio.get_running_loop().run_in_executor(self._commit_thread, call, *args)
        self._thread_job = job
        return job

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


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY (or one of its extended codes): another connection holds the lock."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


def _begin_waiting(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE retried while another process's writer holds the lock, up to the busy
    timeout of the other connections; on the commit thread."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.002)


def _retrieved(future: "asyncio.Future[None]") -> None:
    """A body whose caller was cancelled while it waited for its batch's COMMIT: the COMMIT's
    error, if any, is not "never retrieved"."""
    if not future.cancelled():
        future.exception()


def _settle(batch: list["asyncio.Future[None]"], error: BaseException | None) -> None:
    for future in batch:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def _commit_or_roll_back(conn: sqlite3.Connection) -> None:
    """One job on the commit thread: a failed COMMIT leaves the connection outside a transaction."""
    try:
        conn.execute("COMMIT")
    except BaseException:
        _roll_back(conn)
        raise


def _roll_back(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
