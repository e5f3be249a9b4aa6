"""Group commit of SQLite point transactions (versionstore/gateway.py): point transactions that
queue for the write lock run in one SQLite transaction, each in a savepoint, and all return after
the one COMMIT (one fsync) that covers them. A body that fails leaves the others' writes; no
body waits for a COMMIT nobody runs (a cancelled waiter, a `transaction()` of the other
connection, close). (BEGIN waiting for another process's writer: tests/test_write_commits.py.)"""

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from versionstore import gateway
from versionstore.gateway import IntegrityError, SqliteGateway

_INSERT = "INSERT INTO generations (name, value) VALUES (?, 1)"


@pytest.fixture
async def gate(tmp_path: Path) -> AsyncIterator[SqliteGateway]:
    opened = await SqliteGateway.open(tmp_path / "group.sqlite3")
    try:
        yield opened
    finally:
        await opened.close()


class CommitCount:
    """Counts the COMMITs that reach SQLite (each is one fsync of the WAL)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = gateway._commit_or_roll_back

        def counted(conn: sqlite3.Connection) -> None:
            self.count += 1
            real(conn)

        monkeypatch.setattr(gateway, "_commit_or_roll_back", counted)


async def _names(gate: SqliteGateway) -> set[str]:
    return {name for (name,) in await gate.all("SELECT name FROM generations WHERE name LIKE 'g-%'")}


def _point(gate: SqliteGateway, name: str, hold: asyncio.Event | None = None, fail: bool = False) -> "asyncio.Task[None]":
    async def run() -> None:
        async with gate.point_transaction() as db:
            await db.execute(_INSERT, (name,))
            if hold is not None:
                await hold.wait()
            if fail:
                await db.execute(_INSERT, (name,))  # a unique violation: this body fails

    return asyncio.ensure_future(run())


async def _queued(gate: SqliteGateway, waiters: int) -> None:
    for _ in range(100):
        if gate._point_waiters >= waiters:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{waiters} point transactions never queued")


async def _one_holding_one_queued(gate: SqliteGateway) -> tuple["asyncio.Task[None]", "asyncio.Task[None]", asyncio.Event]:
    """"g-first" holding the lock (its body waits for the event returned), "g-second" queued behind it."""
    hold = asyncio.Event()
    first = _point(gate, "g-first", hold)
    await asyncio.sleep(0.05)
    second = _point(gate, "g-second")
    await _queued(gate, 1)
    return first, second, hold


async def test_queued_point_transactions_share_one_commit_and_a_failed_body_leaves_the_rest(
    gate: SqliteGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = CommitCount(monkeypatch)
    hold = asyncio.Event()
    first = _point(gate, "g-first", hold)
    await asyncio.sleep(0.05)
    queued = [_point(gate, f"g-{i}", fail=i == 3) for i in range(8)]
    await _queued(gate, 8)
    hold.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 10)
    assert [type(r).__name__ for r in results] == ["NoneType"] * 4 + ["IntegrityError"] + ["NoneType"] * 4
    assert isinstance(results[4], IntegrityError)
    assert commits.count == 1
    assert await _names(gate) == {"g-first"} | {f"g-{i}" for i in range(8) if i != 3}
    async with gate.point_transaction() as db:  # alone: its own commit at once
        await db.execute(_INSERT, ("g-alone",))
    assert commits.count == 2 and "g-alone" in await _names(gate)


async def test_a_batch_holds_at_most_group_commit_max_bodies(gate: SqliteGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    commits = CommitCount(monkeypatch)
    monkeypatch.setattr(gateway, "GROUP_COMMIT_MAX", 3)
    hold = asyncio.Event()
    first = _point(gate, "g-first", hold)
    await asyncio.sleep(0.05)
    queued = [_point(gate, f"g-{i}") for i in range(6)]
    await _queued(gate, 6)
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, *queued), 10)
    assert commits.count == 3  # 3 + 3 + 1
    assert len(await _names(gate)) == 7


async def test_a_body_whose_next_waiter_is_cancelled_is_still_committed(gate: SqliteGateway) -> None:
    """The first body leaves the batch open for the one queued behind it, which is cancelled
    before it runs: the batch is committed by a task of its own, not left waiting."""
    first, second, hold = await _one_holding_one_queued(gate)
    hold.set()
    await asyncio.sleep(0)  # the first body ends, sees the second waiting, leaves the batch open
    assert gate._batch_open and not first.done()
    second.cancel()
    await asyncio.wait_for(first, 5)
    with pytest.raises(asyncio.CancelledError):
        await second
    assert await _names(gate) == {"g-first"}
    assert not gate._batch_open


async def test_a_transaction_of_the_other_connection_commits_an_open_batch_first(gate: SqliteGateway) -> None:
    """`transaction()` writes through aiosqlite's connection: the point connection's open batch
    holds SQLite's write lock, so it is committed before that BEGIN (else a 10 s busy wait)."""
    first, second, hold = await _one_holding_one_queued(gate)

    async def other() -> None:
        async with gate.transaction() as db:
            await db.execute(_INSERT, ("g-other",))

    third = asyncio.ensure_future(other())
    await asyncio.sleep(0.05)
    hold.set()
    await asyncio.sleep(0)
    second.cancel()  # the batch stays open while `transaction()` is next in the lock's queue
    await asyncio.wait_for(asyncio.gather(first, third), 5)
    assert await _names(gate) == {"g-first", "g-other"}


async def test_a_failed_commit_fails_every_body_of_the_batch(gate: SqliteGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(conn: sqlite3.Connection) -> None:
        gateway._roll_back(conn)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(gateway, "_commit_or_roll_back", refused)
    first, second, hold = await _one_holding_one_queued(gate)
    hold.set()
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results)
    monkeypatch.undo()
    assert await _names(gate) == set()
    async with gate.point_transaction() as db:  # the connection is usable again
        await db.execute(_INSERT, ("g-next",))
    assert await _names(gate) == {"g-next"}


async def test_closing_commits_an_open_batch(tmp_path: Path) -> None:
    path = tmp_path / "close.sqlite3"
    gate = await SqliteGateway.open(path)
    first, second, hold = await _one_holding_one_queued(gate)
    hold.set()
    await asyncio.sleep(0)
    second.cancel()
    closing: Callable[[], Awaitable[Any]] = gate.close
    await asyncio.wait_for(asyncio.gather(first, closing(), return_exceptions=True), 5)
    assert first.result() is None
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT name FROM generations WHERE name LIKE 'g-%'").fetchall() == [("g-first",)]
    finally:
        check.close()


async def test_point_transactions_keep_their_statement_journal_in_memory(gate: SqliteGateway) -> None:
    """A statement in a savepoint needs a statement journal: with SQLite's default temp store that
    was a file created and unlinked in /var/tmp, on the event loop, once per upload (strace)."""
    assert gate._point is not None and gate._point.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    for name in ("g-1", "g-2"):
        await _point(gate, name)
    async with gate.point_transaction() as db:
        await db.execute("UPDATE generations SET value = value + 1 WHERE name LIKE 'g-%'")  # several rows
    assert await _names(gate) == {"g-1", "g-2"}
