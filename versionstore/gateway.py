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
"""

import asyncio
import re
import sqlite3
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
    #: Migration numbers this open applied (empty when the schema was current).
    applied: list[int]

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any: ...

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]: ...

    def transaction(self) -> AbstractAsyncContextManager[Transaction]: ...

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


class SqliteGateway:
    def __init__(self, writer: aiosqlite.Connection, scanner: aiosqlite.Connection, reader: sqlite3.Connection, applied: list[int]) -> None:
        self._writer = writer
        self._scanner = scanner
        self._reader = reader
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
        return cls(writer, scanner, reader, applied)

    async def close(self) -> None:
        self._reader.close()
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
                if isinstance(exc, sqlite3.IntegrityError) and not isinstance(exc, IntegrityError):
                    match = _UNIQUE_TABLE.search(str(exc))
                    raise IntegrityError(str(exc), match.group(1) if match else None) from exc
                raise
            await self._writer.execute("COMMIT")

    async def lock(self, db: Transaction, key: str) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serialises every writer."""

    def commit_epoch(self) -> object:
        """`PRAGMA data_version` changes whenever another connection (our writer, the CLI)
        commits, and costs less than the row look-up a cache saves."""
        return self._reader.execute("PRAGMA data_version").fetchone()[0]

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._reader.execute(sql, args).fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._reader.execute(sql, args).fetchall()

    async def scan(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return list(await self._scanner.execute_fetchall(sql, args))
