"""The PostgreSQL gateway (asyncpg): MetadataStore's statements, translated, on a pool.

Write semantics (docs/design.md, "Metadata on PostgreSQL"): transactions run at READ
COMMITTED. SQLite serialises every writer; here the invariants rest on what each statement
checks itself (the asset generation compare-and-set, UPDATEs conditional on the state they
leave, unique indexes), and the few units of work that read, decide and then write hold a
transaction-scoped advisory lock on what they decide about (`lock`).

Reads: point reads (`one`, `all`) run on their own few connections (`PointReads`), without
the pool's per-use bookkeeping; scans and transactions use asyncpg's pool. The hot requests
send one statement each (docs/design.md, "Metadata on PostgreSQL"): here every statement is a
round trip.

Caches: `commit_epoch()` moves at this process's commits, at other processes' (each write
transaction sends a notification with its COMMIT, in the same round trip; one connection per
process listens: versionstore/pg_commits.py), and at least every CACHE_SECONDS; None while
nothing listens. What versionstore/epoch_cache.py keeps lags another process's commit by the
notification's delivery, at most CACHE_SECONDS.

Migrations: `schema_migrations` records the blocks of schema.sql applied (translated by
versionstore/dialect.py); a session advisory lock makes processes that start together apply
each block exactly once, one after the other.
"""

import asyncio
import contextlib
import functools
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg

from versionstore.config import StartupError
from versionstore.dialect import placeholders, schema_block
from versionstore.gateway import IntegrityError, Transaction, migrations
from versionstore.pg_commits import CHANNEL, CommitListener

#: pg_advisory_lock key of the migration lock ("versionstore" as an int).
MIGRATION_LOCK = 0x76657273696F6E
#: Seconds a cached value may lag a change another process committed, even if its notification
#: were lost (the time bucket of commit_epoch).
CACHE_SECONDS = 1.0
POOL_SIZE = 10
CLOSE_SECONDS = 10.0
#: Bytes asked of the socket per read on a database connection (see small_reads).
READ_SIZE = 64 * 1024
#: Session settings of every connection. PostgreSQL's parallel_setup_cost (1000) let the planner
#: start two worker processes for a search's bounded count at 10M assets (`tags=xyz`: 1,001
#: index probes, 56-86 ms with workers, 14-30 ms without, docs/scale-out.md); at 10000 the
#: bounded reads (a LIMIT, the count's ceiling) stay in one process, and whole-library
#: aggregates (usage_totals: 53 s with workers, 71 s without) still get workers.
SERVER_SETTINGS = {"parallel_setup_cost": "10000"}


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1:***@", url)


@functools.lru_cache(maxsize=1024)
def _returns_rows(sql: str) -> bool:
    return sql.lstrip()[:4].upper() in ("SELE", "WITH") or "RETURNING" in sql.upper()


@functools.lru_cache(maxsize=1024)
def _verb(sql: str) -> str:
    return sql.lstrip()[:6].upper()


#: Statements whose rows (counted, or returned) say whether they changed anything.
_COUNTED = ("INSERT", "UPDATE", "DELETE")


def _wrote(sql: str, rows: int) -> bool:
    """Whether a statement may have changed the database: not a SELECT, and not an
    INSERT/UPDATE/DELETE that touched no row (others, e.g. WITH or DDL: assumed to)."""
    verb = _verb(sql)
    return verb != "SELECT" and (rows > 0 or verb not in _COUNTED)


def _count(status: str) -> int:
    """Rows an INSERT/UPDATE/DELETE touched, from its status ('UPDATE 3', 'INSERT 0 1')."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def small_reads(conn: asyncpg.Connection) -> asyncpg.Connection:
    """`conn`, reading its socket at most READ_SIZE bytes at a time. asyncio's selector
    transport asks for 256 KiB per read: above glibc's mmap threshold (until the process frees
    a larger mapped block), so each read of a reply (a few hundred bytes on the read path)
    mapped a fresh buffer, resized it and unmapped it: three system calls, about 40 µs of CPU
    per round trip, a third of a point read's client cost (measured in docs/scale-out.md).
    64 KiB comes from the heap; a large result takes a few more reads.
    Transports without the setting (other event loops' own) are left alone."""
    transport: Any = getattr(conn, "_transport", None)
    if isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = READ_SIZE
    return conn


async def _connect(url: str, **settings: str) -> asyncpg.Connection:
    return await small_reads(await asyncpg.connect(url, server_settings={**SERVER_SETTINGS, **settings}))


class PgCursor:
    def __init__(self, rowcount: int, rows: list[tuple[Any, ...]]) -> None:
        self.rowcount = rowcount
        self._rows = rows

    async def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows


class PgTransaction:
    """The cursor-like face of one connection inside a transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        #: Whether a statement may have changed something: then the COMMIT moves this
        #: process's epoch (a transaction that only read, or updated no row, leaves its caches).
        self.wrote = False

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> PgCursor:
        query = placeholders(sql)
        if _returns_rows(sql):
            rows = [tuple(r) for r in await self.conn.fetch(query, *parameters)]
            self.wrote = self.wrote or _wrote(sql, len(rows))
            return PgCursor(len(rows), rows)
        count = _count(await self.conn.execute(query, *parameters))
        self.wrote = self.wrote or _wrote(sql, count)
        return PgCursor(count, [])

    async def executemany(self, sql: str, parameters: Sequence[Sequence[Any]]) -> None:
        self.wrote = True
        await self.conn.executemany(placeholders(sql), parameters)


def _integrity(exc: asyncpg.IntegrityConstraintViolationError) -> IntegrityError:
    table = getattr(exc, "table_name", None) if isinstance(exc, asyncpg.UniqueViolationError) else None
    return IntegrityError(str(exc), table)


async def _roll_back(conn: asyncpg.Connection) -> None:
    """End a failed unit of work. A connection that cannot even roll back (cut, or a statement
    cancelled mid-flight) is left to the pool, which resets or cuts it on release."""
    if not conn.is_closed() and conn.is_in_transaction():
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("ROLLBACK")


async def _reset(conn: asyncpg.Connection) -> None:
    """Before a connection goes back to the pool. asyncpg's default (a reset query: RESET
    ALL, CLOSE ALL, UNLISTEN, unlock all) costs a round trip per point read; we set no session
    state (advisory locks are transaction-scoped, the migration lock is released by its
    holder), so only a connection left inside a transaction (a cancelled rollback) is reset."""
    if conn.is_in_transaction():
        await conn.reset()


class PointReads:
    """Connections for single statements outside a transaction (`one`, `all`): a
    queue of slots, each an open connection or None (not opened yet, or dropped after a
    failure). asyncpg's pool does more per use than a point read needs (a proxy object, a
    reset, an inactivity timer armed and cancelled): a measured share of a read's cost, and
    the read path is mostly point reads (docs/scale-out.md, "Cost at scale"). A statement the
    database refused leaves its connection usable (its implicit transaction ended with it);
    one cut short otherwise (cancelled, the socket lost) drops its connection, and the slot
    opens a new one on its next use (so reads resume by themselves once the database is back)."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._size = size
        self._slots: asyncio.Queue[asyncpg.Connection | None] = asyncio.Queue()
        for _ in range(size):
            self._slots.put_nowait(None)
        self._open: set[asyncpg.Connection] = set()
        self._closed = False

    async def fetch(self, query: str, args: Sequence[Any], *, first: bool = False) -> Any:
        """The rows of `query` (with `first`: its first row, or None)."""
        conn = await self._slots.get()
        if self._closed:
            self._slots.put_nowait(conn)
            raise asyncpg.InterfaceError("the metadata database connections are closed")
        try:
            if conn is None:
                conn = await self._connect()
                self._open.add(conn)
            result = await (conn.fetchrow(query, *args) if first else conn.fetch(query, *args))
        except asyncpg.PostgresError:
            self._give_back(conn)
            raise
        except BaseException:
            if conn is not None:
                self._open.discard(conn)
                conn.terminate()
            self._slots.put_nowait(None)
            raise
        self._slots.put_nowait(conn)
        return result

    def _give_back(self, conn: asyncpg.Connection | None) -> None:
        if conn is not None and conn.is_closed():
            self._open.discard(conn)
            conn = None
        self._slots.put_nowait(conn)

    async def close(self) -> None:
        """Close each connection once it is given back; reads asked for later fail."""
        self._closed = True
        for _ in range(self._size):
            conn = await self._slots.get()
            if conn is not None:
                self._open.discard(conn)
                await conn.close()
        for _ in range(self._size):
            self._slots.put_nowait(None)  # whoever still waits for a slot sees _closed

    def terminate(self) -> None:
        for conn in self._open:
            conn.terminate()
        self._open.clear()


def _commit_sql(instance: str) -> str:
    """COMMIT, preceded (same round trip: a simple query of two statements) by this process's
    notification if the transaction wrote: it has a transaction id only then."""
    return f"SELECT pg_notify('{CHANNEL}', '{instance}') WHERE txid_current_if_assigned() IS NOT NULL; COMMIT"


class PgGateway:
    def __init__(self, pool: asyncpg.Pool, reads: PointReads, listener: CommitListener, applied: list[int]) -> None:
        self._pool = pool
        self._reads = reads
        self._listener = listener
        self._commit = _commit_sql(listener.instance)
        self._commits = 0
        self.applied = applied

    @classmethod
    async def open(cls, url: str, *, pool_size: int = POOL_SIZE) -> "PgGateway":
        """`pool_size` connections at most: half for transactions (asyncpg's pool), half for
        point reads (PointReads); and one that listens for other processes' commits."""
        readers = max(1, pool_size // 2)
        instance = uuid.uuid4().hex
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=max(1, pool_size - readers), reset=_reset, init=small_reads, server_settings=SERVER_SETTINGS
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StartupError(f"cannot open the metadata database {redacted(url)}: {type(exc).__name__}: {exc}") from None
        listener = CommitListener(functools.partial(_connect, url, application_name="versionstore commit listener"), instance)
        try:
            applied = await migrate(pool, instance)
            await listener.start()
        except BaseException:
            await listener.close()
            await pool.close()
            raise
        return cls(pool, PointReads(functools.partial(_connect, url), readers), listener, applied)

    async def close(self) -> None:
        """Wait for connections in use to be released, at most CLOSE_SECONDS (a task that never
        gives its connection back must not keep the process from exiting), then cut them."""
        try:
            await asyncio.wait_for(asyncio.gather(self._listener.close(), self._reads.close(), self._pool.close()), CLOSE_SECONDS)
        except TimeoutError:
            self._reads.terminate()
            self._pool.terminate()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgTransaction]:
        """One transaction on a pooled connection, rolled back on any exception. Its COMMIT
        carries the notification that tells other processes' caches (pg_commits.py)."""
        async with self._pool.acquire() as conn:
            await conn.execute("BEGIN")
            tx = PgTransaction(conn)
            committing = False
            try:
                yield tx
                committing = True
                await conn.execute(self._commit)
            except BaseException as exc:
                await _roll_back(conn)
                if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
                    raise _integrity(exc) from exc
                raise
            finally:
                # Also when COMMIT itself was interrupted (it may have committed, and our own
                # notification is not heard here): a needless move only drops cached values.
                if tx.wrote and committing:
                    self._commits += 1

    def point_transaction(self) -> AbstractAsyncContextManager[PgTransaction]:
        """A transaction like any other: each statement is a round trip either way."""
        return self.transaction()

    async def lock(self, db: Transaction, key: str) -> None:
        await db.execute("SELECT pg_advisory_xact_lock(?)", (zlib.crc32(key.encode()),))

    def commit_epoch(self) -> object | None:
        """Moves when this process commits (as COMMIT returns), when another process's commit
        is heard (pg_commits.py: as its notification is delivered), when the listener
        reconnects, and at least every CACHE_SECONDS (a lost notification lags no longer).
        None while no connection listens: then nothing may be cached."""
        listener = self._listener
        if not listener.listening:
            return None
        return self._commits, listener.heard, listener.generation, int(time.monotonic() / CACHE_SECONDS)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        row = await self._reads.fetch(placeholders(sql), args, first=True)
        return None if row is None else tuple(row)

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return [tuple(r) for r in await self._reads.fetch(placeholders(sql), args)]

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """A read whose cost grows with the library: on the pool, so it never holds up point reads."""
        return [tuple(r) for r in await self._pool.fetch(placeholders(sql), *args)]


async def migrate(pool: asyncpg.Pool, instance: str) -> list[int]:
    """Apply the blocks of schema.sql this database lacks, each in its own transaction, under
    an advisory lock; returns the numbers applied. Each block notifies like any write (a
    block may rewrite rows other processes cache)."""
    applied = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
            for number, block in enumerate(migrations(), start=1):
                if number in done:
                    continue
                async with conn.transaction():
                    await conn.execute(schema_block(block))
                    await conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)", number, time.time())
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, instance)
                applied.append(number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied
